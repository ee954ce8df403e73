"""The local lab and everything that tests syncd from the outside: starting a two-site rig
(``rig``), fault injection (``faults``), the link relay that cuts and delays links (``relay``),
verifying workloads (``workload``), scenarios of the seed's failure lists and their report
(``scenario``, ``report``). No daemon imports this package."""
