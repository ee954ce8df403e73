"""The storage node: ``daemon`` (the process and its nursery), ``group`` (a replication group
at run time), ``operations`` and ``admin`` (operator verbs), ``resync`` and ``verify``, the
volumes and their write-intent logs (``volume``, ``intent``), persistent metadata (``state``),
hosts and path states (``hosts``, ``alua``)."""
