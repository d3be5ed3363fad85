"""The reloader against a real file rewritten in place (not a ConfigMap's atomic symlink swap)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prometheus_client import CollectorRegistry

from authz_service.metrics import Metrics
from authz_service.policy import load_policy_file
from authz_service.reloader import PolicyReloader

HEAD = """issuers:
  - user_pool_id: us-east-1_Abc123
routes:
  - name: everything-else
    path: /**
    public: true
"""
# The specific route that protects /admin comes last in the file: a copy of the file cut before it
# is still a valid policy, one that makes /admin public.
TAIL = """  - name: admin
    path: /admin/**
    scopes: [admin/all]
"""


async def test_half_written_file_is_never_loaded(tmp_path: Path) -> None:
    """Found by review of test_process_faults_e2e (policy changed under load): a poll that lands
    between two writes of an in-place rewrite (editor, cp, a shell redirect) must not serve the
    truncated policy, even though it parses. (A writer pausing longer than a whole poll interval
    mid-file can still be caught: write a temporary file and rename it, as Kubernetes does.)"""
    path = tmp_path / "policy.yaml"
    path.write_text("issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n  - path: /healthz\n    public: true\n")
    reloader = PolicyReloader(path, load_policy_file(path), Metrics(CollectorRegistry()))
    served = []

    async def poll() -> None:
        await reloader.poll()
        served.append(reloader.policy.match("GET", ("admin", "users")))

    with open(path, "w") as fh:  # in place: truncate, write the head, (a poll), write the rest
        fh.write(HEAD)
        fh.flush()
        await poll()  # the writer pauses for less than a poll interval
        fh.write(TAIL)
    for _ in range(3):
        await poll()
    assert all(route is None or route.name == "admin" for route in served), [r and r.name for r in served]
    assert served[-1] is not None and served[-1].name == "admin"  # the complete file did load


async def test_a_stable_change_is_loaded_on_the_next_poll_and_a_missing_file_never(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD)
    reloader = PolicyReloader(path, load_policy_file(path), Metrics(CollectorRegistry()))
    path.write_text(HEAD + TAIL)
    assert await reloader.poll() is False  # changed: wait one interval to see that it stays put
    assert await reloader.poll() is True
    assert reloader.policy.match("GET", ("admin",)).name == "admin"
    path.unlink()
    for _ in range(3):
        await reloader.poll()
    assert reloader.policy.match("GET", ("admin",)).name == "admin"  # old policy keeps serving


# --- inotify: a file loads once its writer has closed it ----------------------------------------------


def inotify_reloader(path: Path, mode: str = "auto") -> PolicyReloader:
    reloader = PolicyReloader(path, load_policy_file(path), Metrics(CollectorRegistry()))
    reloader.open_watch(mode)
    assert reloader.mode == "inotify"
    return reloader


def admin_route(reloader: PolicyReloader) -> str | None:
    route = reloader.policy.match("GET", ("admin", "users"))
    return route.name if route else None


PROTECTED = "issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n  - path: /healthz\n    public: true\n"


async def test_a_writer_that_pauses_mid_file_is_not_loaded_until_it_closes(tmp_path: Path) -> None:
    """The kernel queues IN_MODIFY at write time, so every event below is readable when the
    reloader looks: no timing is involved. The paused prefix is a valid policy that opens /admin."""
    path = tmp_path / "policy.yaml"
    path.write_text(PROTECTED)
    reloader = inotify_reloader(path)
    with open(path, "w") as writer:
        writer.write(HEAD)
        writer.flush()
        await reloader.handle_events()
        assert admin_route(reloader) is None and reloader.policy.sha256 == load_policy_file_sha(PROTECTED)
        assert await reloader.reload("SIGHUP") is False  # SIGHUP too waits for the writer
        await reloader.poll()
        await reloader.poll()  # the polling rule alone would have loaded the prefix by now
        assert admin_route(reloader) is None
        writer.write(TAIL)
    await reloader.handle_events()  # IN_CLOSE_WRITE
    assert admin_route(reloader) == "admin"


def load_policy_file_sha(text: str) -> str:
    from authz_service.policy import parse_policy

    return parse_policy(text).sha256


async def test_a_new_file_written_slowly_after_a_delete_is_not_loaded_until_closed(tmp_path: Path) -> None:
    """``rm f; cat > f``: the events of the new file come after its CREATE and must count for it."""
    path = tmp_path / "policy.yaml"
    path.write_text(PROTECTED)
    reloader = inotify_reloader(path)
    path.unlink()
    with open(path, "w") as writer:
        writer.write(HEAD)
        writer.flush()
        await reloader.handle_events()
        assert admin_route(reloader) is None
        writer.write(TAIL)
    await reloader.handle_events()
    assert admin_route(reloader) == "admin"


async def test_a_file_renamed_into_place_loads_at_once(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(PROTECTED)
    reloader = inotify_reloader(path)
    staged = tmp_path / ".policy.yaml.tmp"
    with open(staged, "w") as writer:  # another name: its writes are not the policy's
        writer.write(HEAD)
        writer.flush()
        await reloader.handle_events()
        assert admin_route(reloader) is None and reloader.policy.sha256 == load_policy_file_sha(PROTECTED)
        writer.write(TAIL)
    staged.rename(path)
    await reloader.handle_events()
    assert admin_route(reloader) == "admin"


def configmap(root: Path, text: str, generation: int) -> None:
    """Lay out or update ``root/policy.yaml`` as the kubelet does: ..data -> ..<generation>/."""
    folder = root / f"..{generation}"
    folder.mkdir()
    (folder / "policy.yaml").write_text(text)
    (root / "..data_tmp").symlink_to(folder.name)
    (root / "..data_tmp").rename(root / "..data")
    if not (root / "policy.yaml").is_symlink():
        (root / "policy.yaml").symlink_to("..data/policy.yaml")


async def test_configmap_swap_and_in_place_edit_of_the_symlink_target(tmp_path: Path) -> None:
    """The swap shows in the path's directory; an in-place edit of the file the symlinks resolve to
    shows only in the target's directory, which is watched too (and re-armed after each swap)."""
    configmap(tmp_path, PROTECTED, 1)
    path = tmp_path / "policy.yaml"
    reloader = inotify_reloader(path)
    configmap(tmp_path, HEAD, 2)
    await reloader.handle_events()
    assert admin_route(reloader) == "everything-else"
    with open(tmp_path / "..2" / "policy.yaml", "a") as writer:
        writer.write(TAIL)
        writer.flush()
        await reloader.handle_events()
        assert admin_route(reloader) == "everything-else"  # open for writing: not yet
    await reloader.handle_events()
    assert admin_route(reloader) == "admin"


async def test_poll_mode_and_fallback_when_inotify_is_unavailable(tmp_path: Path, monkeypatch) -> None:
    from authz_service import reloader as module

    path = tmp_path / "policy.yaml"
    path.write_text(PROTECTED)
    forced = PolicyReloader(path, load_policy_file(path), Metrics(CollectorRegistry()))
    forced.open_watch("poll")
    assert forced.mode == "poll"

    def unavailable(_path: Path) -> None:
        raise module.InotifyUnavailable("the inotify instance limit (fs.inotify.max_user_instances) is reached")

    monkeypatch.setattr(module, "_Inotify", unavailable)
    fallback = PolicyReloader(path, load_policy_file(path), Metrics(CollectorRegistry()))
    fallback.open_watch("auto")
    assert fallback.mode == "poll"
    required = PolicyReloader(path, load_policy_file(path), Metrics(CollectorRegistry()))
    with pytest.raises(OSError, match="--policy-watch inotify: cannot watch .*max_user_instances.*--policy-watch auto"):
        required.open_watch("inotify")


async def test_a_writer_starting_while_the_file_is_read_drops_what_was_read(tmp_path: Path, monkeypatch) -> None:
    """No writer when the load was decided, one by the end of the read: what was read may be a
    prefix, so it is not served; the writer's close loads the file."""
    from authz_service import reloader as module

    path = tmp_path / "policy.yaml"
    path.write_text(PROTECTED)
    reloader = inotify_reloader(path)
    writers = []

    def read_then_a_writer_starts(where: Path):
        policy = load_policy_file(where)
        writer = open(path, "w")  # noqa: SIM115 - closed by the test below
        writer.write(HEAD)
        writer.flush()
        writers.append(writer)
        return policy

    monkeypatch.setattr(module, "load_policy_file", read_then_a_writer_starts)
    staged = tmp_path / "staged.yaml"
    staged.write_text(HEAD + TAIL)
    staged.rename(path)
    await reloader.handle_events()
    assert reloader.policy.sha256 == load_policy_file_sha(PROTECTED) and reloader.last_error is None
    monkeypatch.setattr(module, "load_policy_file", load_policy_file)
    writers[0].write(TAIL)
    writers[0].close()
    await reloader.handle_events()
    assert admin_route(reloader) == "admin"


async def test_after_lost_events_a_change_must_hold_still_before_it_loads(tmp_path: Path) -> None:
    """When the kernel's event queue overflows, a writer's IN_MODIFY may be among the lost events:
    the change then loads only by the polling rule (unchanged over a whole interval), never at once."""
    path = tmp_path / "policy.yaml"
    path.write_text(PROTECTED)
    reloader = inotify_reloader(path)
    queue = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    noise = tmp_path / "noise"
    for _ in range(queue // 2 + 1):  # CREATE and DELETE alternate, so the kernel cannot merge them
        noise.touch()
        noise.unlink()
    with open(path, "w") as writer:  # its IN_MODIFY comes after the queue is full: lost
        writer.write(HEAD)
        writer.flush()
        await reloader.handle_events()
        assert admin_route(reloader) is None  # not at once, though the file's signature changed
    writer_closed_at = reloader.policy.sha256
    await reloader.handle_events()  # the writer's close (queued now that the queue was read)
    assert reloader.policy.sha256 != writer_closed_at and admin_route(reloader) == "everything-else"


async def test_each_load_is_a_root_span_with_its_trigger_result_and_the_serving_sha256(tmp_path: Path,
                                                                                      traced) -> None:
    tracing, spans = traced
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD)
    first = load_policy_file(path)
    reloader = PolicyReloader(path, first, Metrics(CollectorRegistry()), tracing=tracing)
    path.write_text(HEAD + TAIL)
    assert await reloader.reload("SIGHUP")
    path.write_text("routes: [")
    assert not await reloader.reload("SIGHUP")
    assert not await reloader.reload("file changed")  # the same bad file again
    path.write_text(HEAD + TAIL)
    assert not await reloader.reload("SIGHUP")  # unchanged content
    results = [(s.name, s.parent, s.attributes["authz.policy.trigger"], s.attributes["authz.policy.result"],
                s.attributes["authz.policy.sha256"]) for s in spans.get_finished_spans()]
    second = reloader.policy.sha256
    assert second != first.sha256
    assert results == [("policy reload", None, "SIGHUP", "ok", second),
                       ("policy reload", None, "SIGHUP", "error", second),
                       ("policy reload", None, "file changed", "error", second),
                       ("policy reload", None, "SIGHUP", "unchanged", second)]
    assert spans.get_finished_spans()[1].status.description == "policy refused; the previous policy keeps serving"


# --- the refused file, exported as a state -----------------------------------------------------------


def refused_series(metrics: Metrics) -> dict[str, float]:
    """sha256 label -> value of every authz_policy_file_refused series ("" = no hash: unreadable, or none)."""
    return {sample.labels["sha256"]: sample.value for family in metrics.registry.collect()
            if family.name == "authz_policy_file_refused" for sample in family.samples}


def sha256_of(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


async def test_a_refused_file_stays_exported_until_it_is_fixed_or_put_back(tmp_path: Path) -> None:
    """The error counter says a load failed once; the gauge says the file on disk is refused *now*
    (a Pod starting now would not start): 1 with the refused content's sha256 until a good file loads
    or the file is put back to the policy in force."""
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD)
    metrics = Metrics(CollectorRegistry())
    reloader = PolicyReloader(path, load_policy_file(path), metrics)
    assert refused_series(metrics) == {"": 0}
    bad = "routes: ["
    path.write_text(bad)
    assert not await reloader.reload("SIGHUP")
    assert refused_series(metrics) == {sha256_of(bad): 1}
    assert reloader.refused_sha256 == sha256_of(bad)
    assert not await reloader.reload("SIGHUP")  # the same file again: still refused, one series
    assert refused_series(metrics) == {sha256_of(bad): 1}
    worse = HEAD + "  - name: x\n    path: /x\n"  # neither scopes nor public
    path.write_text(worse)
    assert not await reloader.reload("file changed")
    assert refused_series(metrics) == {sha256_of(worse): 1}  # the new content replaces the old
    path.write_text(HEAD)  # put back: the policy in force, nothing to load
    assert not await reloader.reload("SIGHUP")
    assert refused_series(metrics) == {"": 0} and reloader.refused_sha256 is None
    path.write_text(bad)
    assert not await reloader.reload("SIGHUP")
    path.write_text(HEAD + TAIL)  # fixed: a new policy serves
    assert await reloader.reload("SIGHUP")
    assert refused_series(metrics) == {"": 0}
    path.unlink()  # unreadable: refused, with no content to name
    assert not await reloader.reload("SIGHUP")
    assert refused_series(metrics) == {"": 1} and reloader.refused_sha256 is None
    assert metrics.registry.get_sample_value("authz_policy_reloads_total", {"result": "error"}) == 5


async def test_a_file_changed_while_it_was_read_leaves_the_refused_state_alone(tmp_path: Path, monkeypatch) -> None:
    """A read the writer overtook proves nothing about the file: neither refused nor fixed."""
    from authz_service import reloader as module

    path = tmp_path / "policy.yaml"
    path.write_text(HEAD)
    metrics = Metrics(CollectorRegistry())
    reloader = PolicyReloader(path, load_policy_file(path), metrics)
    path.write_text("routes: [")
    assert not await reloader.reload("SIGHUP")

    def overtaken(where: Path):
        path.write_text(HEAD + TAIL + "# still being written")
        raise module.PolicyError(f"{where}: cut short")

    monkeypatch.setattr(module, "load_policy_file", overtaken)
    assert not await reloader.reload("SIGHUP")
    assert refused_series(metrics) == {sha256_of("routes: ["): 1}


async def test_a_sighup_that_finds_nothing_new_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An operator who sends SIGHUP learns it arrived: a file the same as the policy in force logs
    `policy unchanged` with its sha256 (a load logs `policy reloaded`, a refusal its error)."""
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD)
    policy = load_policy_file(path)
    reloader = PolicyReloader(path, policy, Metrics(CollectorRegistry()))
    with caplog.at_level("INFO", logger="authz_service.reloader"):
        assert not await reloader.reload("SIGHUP")
    unchanged = [r for r in caplog.records if r.getMessage().startswith("policy unchanged")]
    assert len(unchanged) == 1, [r.getMessage() for r in caplog.records]
    assert (unchanged[0].reason, unchanged[0].sha256) == ("SIGHUP", policy.sha256)
