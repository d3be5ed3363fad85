"""The xDS form of a compiled policy: a small static bootstrap, and the ingress listener in a file
Envoy watches (file-based xDS), rewritten whenever the policy changes.

Why a file and not a bootstrap: Envoy never re-reads its bootstrap, but it reloads a listener
(LDS) file whenever a file is moved into the watched directory. So ``serve --native-xds-dir DIR``
(control.py) writes the listener compiled from the policy it serves into DIR on start-up and on
every reload, and Envoy, started once with ``compile envoy --xds-dir DIR``'s bootstrap, follows
without a restart. Only the ingress listener depends on the policy (its routes, its filters and
their answers); the clusters, the health listener and the admin interface are static.

How a change reaches Envoy: the listener is written to a temporary file in DIR and renamed over
the old one (``write_atomically``), so Envoy, woken by the rename (``IN_MOVED_TO`` on the
directory), reads a whole file, never half of one. Envoy builds the new listener (fetching the
keys of any new issuer from the service first), then moves new connections to it; connections on
the old one are drained (Envoy's ``--drain-strategy immediate``: each is closed after its next
response, an idle one after ``--drain-time-s``; an HTTP/2 one gets no grace for new streams,
bootstrap.DRAIN_TIMEOUT). A listener Envoy refuses leaves the old one in
place (``listener_manager.lds.update_rejected``).

Which policy Envoy enforces: the listener's ``version_info`` is the policy's sha256, shown by
Envoy as the text stat ``listener_manager.lds.version_text`` and exported to Prometheus by the
health listener (``envoy_listener_manager_lds_version_text{text_value=...}``), beside the
service's ``authz_policy_info{sha256=...}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from .bootstrap import HEALTH, INGRESS, NODE, Compiled, static_parts
from .options import Options

LISTENERS_FILE = "listeners.json"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
# Envoy's Prometheus exposition leaves text stats out unless asked; the listener's version is one.
STATS_PROMETHEUS = "/stats/prometheus"
STATS_WITH_VERSION = "/stats/prometheus?text_readouts"
# The Envoy command-line flags the xDS form needs (docs/native.md, "Policy changes"): a listener
# field an older Envoy does not know refused rather than ignored, and the old listener's
# connections drained at once rather than over ten minutes.
ENVOY_FLAGS = ("--reject-unknown-dynamic-fields", "--drain-strategy", "immediate", "--drain-time-s", "5")


def xds_bootstrap(options: Options, xds_dir: PurePosixPath) -> dict[str, Any]:
    """The bootstrap of an Envoy whose ingress listener is the file in ``xds_dir`` (ValueError when
    an option cannot serve, as ``compile_policy``). ``options``: the addresses; the listener's own
    settings (``listen``, ``realm``, ``leeway``, the key and token caches) are the service's."""
    parts = static_parts(options)
    _export_listener_version(parts.health)
    return {
        **parts.static,
        "node": dict(NODE),
        "dynamic_resources": {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(xds_dir / LISTENERS_FILE),
                    # Reloaded whenever an entry is moved into the directory: our rename, or the
                    # kubelet's symlink swap if the directory were a ConfigMap volume.
                    "watched_directory": {"path": str(xds_dir)},
                },
            }
        },
        "static_resources": {"listeners": [parts.health], "clusters": parts.clusters},
    }


def listener_resources(compiled: Compiled) -> dict[str, Any]:
    """The LDS file's content: a DiscoveryResponse holding the ingress listener, its version the
    policy's sha256."""
    ingress = next(listener for listener in compiled.listeners if listener["name"] == INGRESS)
    return {"version_info": compiled.policy.sha256, "resources": [{"@type": LISTENER_TYPE, **ingress}]}


def listener_text(compiled: Compiled) -> str:
    """The LDS file as written: JSON (Envoy reads a file by its extension; JSON is the quickest to
    write and to read for a listener of thousands of lines)."""
    return json.dumps(listener_resources(compiled), separators=(",", ":")) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it over: Envoy (or a file watcher) never
    reads half a file. Readable as any file the user writes (not mkstemp's 0600): Envoy may run as
    another user sharing the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _export_listener_version(health: dict[str, Any]) -> None:
    """The health listener's ``GET /stats/prometheus`` asks the admin interface for the text stats
    too (the path the scraper sends is unchanged): the listener's version then reaches Prometheus."""
    assert health["name"] == HEALTH
    chain = health["filter_chains"][0]["filters"][-1]["typed_config"]
    for host in chain["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            if route.get("match", {}).get("path") == STATS_PROMETHEUS:
                route["route"]["prefix_rewrite"] = STATS_WITH_VERSION
                return
    raise ValueError(f"the health listener has no {STATS_PROMETHEUS} route")
