"""The host shim's metrics, read from the shim's own objects when scraped: what the host's tools
asked of each volume (as they saw it) and how each path to the arrays is doing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..nbd.export import ALUA_NAMES
from .expose import Families, io_families

if TYPE_CHECKING:
    from ..host import Shim

PATH_STATES = (*ALUA_NAMES.values(), "unreachable")


def collect_host(shim: "Shim", fam: Families) -> None:
    h = shim.cfg.name
    vl = ["host", "volume"]
    pl = ["host", "volume", "array", "path"]
    for v in shim.volumes.values():
        key = [h, v.name]
        io_families(fam, "syncd_shim_volume", vl, key, v.io_stats, "by the host's tools")
        for k, what in (("reissued", "Requests re-issued on another path"),
                        ("queued_no_path", "Times requests queued with no usable path"),
                        ("failed", "Requests failed to the host's tools (no path in time, or an error of the request)"),
                        ("quarantine_waits", "Writes that waited for an overlapping re-issued write's bound")):
            fam.counter(f"syncd_shim_volume_{k}", what, vl).add_metric(key, v.stats[k])
        fam.gauge("syncd_shim_volume_epoch", "Highest epoch seen on the volume's paths", vl).add_metric(
            key, v.max_epoch)
        for p in v.paths:
            pk = [h, v.name, p.array, p.uri]
            state = ALUA_NAMES.get(p.state, str(p.state)) if p.state is not None else "unreachable"
            fam.enum("syncd_shim_path_alua_state", "ALUA state of the path as last read (unreachable: no connection)",
                     pl, PATH_STATES, pk, state)
            fam.gauge("syncd_shim_path_connected", "1 while the path is connected", pl).add_metric(
                pk, 1 if p.client is not None else 0)
            fam.gauge("syncd_shim_path_epoch", "Epoch the path's array shows", pl).add_metric(pk, p.epoch)
            fam.gauge("syncd_shim_path_usable", "1 while the shim would send requests on the path", pl).add_metric(
                pk, 1 if v.usable(p) else 0)
            fam.counter("syncd_shim_path_requests", "Requests completed on the path", pl).add_metric(pk, p.ios)
            fam.counter("syncd_shim_path_errors", "Requests that failed on the path (then re-issued or failed)",
                        pl).add_metric(pk, p.errors)
            fam.gauge("syncd_shim_path_inflight_requests", "Requests outstanding on the path", pl).add_metric(
                pk, p.inflight)
