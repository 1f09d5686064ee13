"""The secure sum (SecAgg, Bonawitz et al. 2017) over the loopback transport: exactly the modular sum of the
contributors, within the threshold whatever stage a client drops at; an abort below it reveals nothing; a masked
upload, and any partial sum of them, looks uniform; tampered requests are refused.

Skipped without flwr (the core venv); runs in the flower venv.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from hf_fedlora.flower.secure_sum import (  # noqa: E402
    LoopbackClient,
    SecureSumAborted,
    SecureSumConfig,
    SecureSumSession,
    client_mask,
    client_receive_shares,
    client_setup,
    client_share_keys,
    client_unmask,
    default_threshold,
    loopback_exchange,
    mask_stream,
    modular_sum,
    run_secure_sum,
)

SESSION = bytes(range(16))


def make_clients(names, size, bits, seed=0, uploads=None):
    """Each client's private upload: random residues, with 0 and 2^bits - 1 up front so the sums wrap."""
    rng = np.random.default_rng(seed)
    if uploads is None:
        uploads = {name: rng.integers(0, 2**bits, size, dtype=np.int64) for name in names}
        for vector in uploads.values():
            vector[:2] = [0, 2**bits - 1][:size]
    return uploads, {name: LoopbackClient(name, uploads[name]) for name in names}


def secure_sum(names, size, config, drop=None, seed=0, uploads=None):
    uploads, clients = make_clients(names, size, config.bits, seed, uploads)
    exchange = loopback_exchange(clients, drop)
    return run_secure_sum(SecureSumSession(names, size, config), exchange, exchange), uploads, clients


def ask(clients, stage, requests):
    return {name: clients[name](stage, request) for name, request in requests.items()}


def to_unmask(names, size, config, lost=(), seed=0):
    """A session driven by hand up to its unmask stage; the uploads of `lost` never arrive."""
    uploads, clients = make_clients(names, size, config.bits, seed)
    session = SecureSumSession(names, size, config)
    session.accept_keys(ask(clients, "setup", session.setup_requests()))
    session.accept_shares(ask(clients, "share", session.share_requests()))
    for name, masked in ask(clients, "upload", session.upload_requests()).items():
        if name not in lost:
            session.accept_upload(name, masked)
    return session, clients, uploads, session.unmask_requests()


def chi_square(values, bins):
    counts = np.bincount(values, minlength=bins)
    expected = len(values) / bins
    return float(((counts - expected) ** 2 / expected).sum())


# --- the pieces -------------------------------------------------------------------------------------------------
def test_mask_stream_is_keyed_in_range_and_uniform():
    key = bytes(32)
    stream = mask_stream(key, SESSION, b"self", 1 << 16, 4)
    assert stream.dtype == np.int64 and stream.shape == (1 << 16,)
    assert np.array_equal(stream, mask_stream(key, SESSION, b"self", 1 << 16, 4))  # the server rebuilds it
    for other in (
        mask_stream(b"\x01" + bytes(31), SESSION, b"self", 1 << 16, 4),
        mask_stream(key, bytes(16), b"self", 1 << 16, 4),
        mask_stream(key, SESSION, b"pair", 1 << 16, 4),
    ):
        assert np.mean(stream == other) < 0.1  # 1/16 by chance
    assert chi_square(stream, 16) < 50  # 15 degrees of freedom: p < 1e-5 above 50
    wide = mask_stream(key, SESSION, b"self", 1 << 14, 48)
    assert wide.min() >= 0 and wide.max() < 2**48 and wide.max() > 2**47
    assert chi_square(wide >> 44, 16) < 50  # the top bits are uniform too
    assert mask_stream(key, SESSION, b"self", 1000, 62).max() < 2**62


def test_default_threshold_is_a_majority_and_at_least_n_min():
    assert [default_threshold(n, 1) for n in (1, 2, 3, 4, 5, 10)] == [1, 2, 2, 3, 3, 6]
    assert default_threshold(10, 8) == 8
    assert default_threshold(3, 5) == 3  # at most n: the session then aborts, since n < n_min
    assert default_threshold(0, 2) == 1


def test_modular_sum_wraps_and_refuses_values_out_of_range():
    assert modular_sum([np.array([3, 255]), np.array([254, 1])], 8).tolist() == [1, 0]
    with pytest.raises(ValueError, match="outside"):
        modular_sum([np.array([256])], 8)


# --- the sum ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits,clients,size", [(16, 2, 1), (16, 3, 1000), (20, 4, 257), (32, 5, 4096), (48, 7, 513), (32, 6, 2)]
)
def test_the_secure_sum_is_the_modular_sum(bits, clients, size):
    names = [f"client-{i}" for i in range(clients)]
    config = SecureSumConfig(bits, default_threshold(clients, 2), min_contributors=2)
    result, uploads, loop = secure_sum(names, size, config, seed=bits + clients)
    assert result.total.dtype == np.int64
    assert np.array_equal(result.total, modular_sum(uploads.values(), bits))
    assert result.contributors == names and result.dropped == {}
    for client in loop.values():  # every secret is forgotten after the unmask
        assert client.state["stage"] == "done" and set(client.state) == {"session", "stage", "name"}


@pytest.mark.parametrize("stage", ["setup", "share", "upload", "unmask"])
def test_a_dropout_at_any_stage_within_the_threshold_gives_the_sum_of_the_contributors(stage):
    names = [f"c{i}" for i in range(5)]
    config = SecureSumConfig(20, default_threshold(5, 2), 2)  # t = 3
    result, uploads, _ = secure_sum(names, 300, config, drop={"c2": stage})
    contributors = names if stage == "unmask" else [name for name in names if name != "c2"]  # after its upload
    assert result.contributors == contributors
    assert result.dropped == {"c2": stage}
    assert np.array_equal(result.total, modular_sum([uploads[name] for name in contributors], 20))


def test_dropouts_at_every_stage_at_once():
    names = [f"c{i}" for i in range(7)]
    config = SecureSumConfig(32, threshold=3, min_contributors=2)
    drop = {"c1": "setup", "c2": "share", "c3": "upload", "c4": "unmask"}
    result, uploads, _ = secure_sum(names, 1000, config, drop=drop)
    assert result.contributors == ["c0", "c4", "c5", "c6"]  # three unmask replies: exactly t
    assert result.dropped == drop
    assert np.array_equal(result.total, modular_sum([uploads[name] for name in result.contributors], 32))


def test_refused_or_malformed_replies_are_dropouts():
    names = [f"c{i}" for i in range(4)]
    config = SecureSumConfig(16, 2, 2)
    uploads, clients = make_clients(names, 50, 16)
    session = SecureSumSession(names, 50, config)
    replies = ask(clients, "setup", session.setup_requests())
    replies["c0"] = {**replies["c0"], "session": bytes(16)}  # a stale reply from another session
    session.accept_keys(replies)
    session.accept_shares(ask(clients, "share", session.share_requests()))
    masked = ask(clients, "upload", session.upload_requests())
    with pytest.raises(ValueError, match="1-D integer vector"):
        session.accept_upload("c1", masked["c1"][:-1])
    with pytest.raises(ValueError, match="no upload expected"):
        session.accept_upload("c0", masked["c2"])
    for name in ("c2", "c3"):
        session.accept_upload(name, masked[name])
    with pytest.raises(ValueError, match="no upload expected"):
        session.accept_upload("c2", masked["c2"])  # a second upload
    result = session.finish(ask(clients, "unmask", session.unmask_requests()))
    assert result.dropped == {"c0": "setup", "c1": "upload"}
    assert "another session" in result.reasons["c0"] and "1-D" in result.reasons["c1"]
    assert np.array_equal(result.total, modular_sum([uploads["c2"], uploads["c3"]], 16))


# --- aborts ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "clients,threshold,min_contributors,drop,stage",
    [
        (4, 3, 2, {"c0": "setup", "c1": "setup"}, "setup"),  # 2 keys < t
        (4, 3, 2, {"c0": "setup", "c1": "share"}, "share"),  # 2 shared < t
        (5, 3, 4, {"c0": "upload", "c1": "upload"}, "upload"),  # 3 uploads >= t but < n_min
        (5, 3, 2, {"c0": "unmask", "c1": "unmask", "c2": "unmask"}, "unmask"),  # 2 unmask replies < t
    ],
)
def test_too_few_parties_abort_and_reveal_nothing(clients, threshold, min_contributors, drop, stage):
    names = [f"c{i}" for i in range(clients)]
    config = SecureSumConfig(16, threshold, min_contributors)
    uploads, loop = make_clients(names, 100, 16)
    session = SecureSumSession(names, 100, config)
    exchange = loopback_exchange(loop, drop)
    with pytest.raises(SecureSumAborted) as aborted:
        run_secure_sum(session, exchange, exchange)
    assert aborted.value.stage == stage and aborted.value.dropped == drop
    ran = {name: client.stages for name, client in loop.items()}
    if stage in ("setup", "share"):  # before any training
        assert not any("upload" in stages for stages in ran.values())
    if stage != "unmask":  # no client was asked for a share: the masked sum stays masked
        assert not any("unmask" in stages for stages in ran.values())
    with pytest.raises(RuntimeError, match="aborted"):  # and the session gives nothing afterwards
        session.finish({})


def test_fewer_parties_than_needed_abort_at_once():
    with pytest.raises(SecureSumAborted, match="fewer than max"):
        SecureSumSession(["a", "b"], 10, SecureSumConfig(16, 2, 3))


def test_a_corrupted_share_aborts_instead_of_a_wrong_sum():
    """Shamir's combine returns garbage from a bad share; the rebuilt b must match its hash, sk1 its pk1."""
    names = [f"c{i}" for i in range(4)]
    for message, index in (
        ("rebuilt mask seed", 0),
        ("rebuilt key", -1),
    ):  # c0's share of c0's b, or of the dead c3's sk1
        session, clients, _, requests = to_unmask(names, 64, SecureSumConfig(16, 3, 2), lost=("c3",))
        replies = ask(clients, "unmask", requests)
        shares = list(replies["c0"]["shares"])
        shares[index] = shares[index][:4] + bytes(16) + shares[index][20:]  # its first chunk: the secret's start
        replies["c0"] = {**replies["c0"], "shares": shares}
        with pytest.raises(SecureSumAborted, match=message):
            session.finish(replies)


# --- what the server sees -------------------------------------------------------------------------------------------
def test_masked_uploads_and_their_partial_sums_look_uniform():
    """Zero uploads: the secure sum is zero, yet each masked upload, the sum of all but one, and a masked upload
    without its self mask (the server rebuilds b of every uploader) are uniform: the pairwise masks hide it."""
    names, size, bits = ["a", "b", "c"], 1 << 14, 16
    uploads = {name: np.zeros(size, dtype=np.int64) for name in names}
    _, clients = make_clients(names, size, bits, uploads=uploads)
    exchange = loopback_exchange(clients)
    session = SecureSumSession(names, size, SecureSumConfig(bits, 2, 2))
    seen, seeds = {}, {}

    def upload(stage, requests, timeout):
        seeds.update({name: clients[name].state["seed"] for name in requests})  # forgotten once masked
        seen.update({name: masked.astype(np.int64) for name, masked in exchange(stage, requests, timeout).items()})
        return seen

    result = run_secure_sum(session, exchange, upload)
    assert not result.total.any()
    assert np.mean(seen["a"] == seen["b"]) < 0.01 and np.mean(seen["a"] == 0) < 0.01
    partial = (seen["a"] + seen["b"]) % 2**bits  # the pairwise masks with c do not cancel
    unselfed = (seen["a"] - mask_stream(seeds["a"], session.session, b"self", size, bits)) % 2**bits
    for vector in (seen["a"], seen["b"], seen["c"], partial, unselfed):
        assert abs(vector.mean() - 2 ** (bits - 1)) < 5 * 2**bits / np.sqrt(12 * size)
        assert chi_square(vector >> (bits - 4), 16) < 50


# --- tampering ------------------------------------------------------------------------------------------------------
def setup_states(names, config, session=SESSION, size=8):
    """Each client's state after S0 (the replies too)."""
    states, replies = {}, {}
    for name in names:
        request = {"action": "setup", "session": session, "name": name, "names": names, "bits": config.bits}
        request.update(threshold=config.threshold, min_contributors=config.min_contributors, size=size)
        states[name] = {}
        replies[name] = client_setup(request, states[name])
    return states, replies


def test_requests_for_another_session_or_stage_are_refused():
    names = ["a", "b", "c"]
    states, replies = setup_states(names, SecureSumConfig(16, 2, 2))
    with pytest.raises(ValueError, match="set up already"):
        client_setup({"action": "setup", "session": SESSION, "name": "a", "names": names}, states["a"])
    share = {
        "action": "share",
        "session": SESSION,
        "names": names,
        "pk1s": [replies[n]["pk1"] for n in names],
        "pk2s": [replies[n]["pk2"] for n in names],
    }
    with pytest.raises(ValueError, match="another session"):
        client_share_keys({**share, "session": bytes(16)}, states["a"])
    with pytest.raises(ValueError, match="own keys"):
        client_share_keys({**share, "pk1s": share["pk1s"][::-1]}, states["a"])
    with pytest.raises(ValueError, match="fewer than"):
        client_share_keys(
            {**share, "names": names[:1], "pk1s": share["pk1s"][:1], "pk2s": share["pk2s"][:1]}, states["a"]
        )
    with pytest.raises(ValueError, match="nothing to mask"):
        client_mask(np.zeros(8, dtype=np.int64), states["a"])
    shared = {name: client_share_keys(share, states[name]) for name in names}
    with pytest.raises(ValueError, match="at stage 'share'"):
        client_share_keys(share, states["a"])  # a stale S1 delivered twice

    def upload(dst, srcs, ctxts=None):
        ctxts = ctxts or [shared[src]["ctxts"][shared[src]["dsts"].index(dst)] for src in srcs]
        return {"action": "upload", "session": SESSION, "srcs": srcs, "ctxts": ctxts}

    with pytest.raises(ValueError, match="another session"):
        client_receive_shares({**upload("a", ["b", "c"]), "session": bytes(16)}, states["a"])
    with pytest.raises(ValueError, match="do not decrypt"):  # c's shares for b, passed off as for a
        client_receive_shares(upload("a", ["c", "b"], upload("b", ["c", "a"])["ctxts"]), states["a"])
    with pytest.raises(ValueError, match="not addressed"):  # a's own shares for b, reflected back as from b
        client_receive_shares(
            upload("a", ["b", "c"], [shared["a"]["ctxts"][0], upload("a", ["c"])["ctxts"][0]]), states["a"]
        )
    flipped = upload("a", ["b", "c"])
    flipped["ctxts"][0] = flipped["ctxts"][0][:-5] + b"AAAAA"
    with pytest.raises(ValueError, match="do not decrypt"):
        client_receive_shares(flipped, states["a"])
    client_receive_shares(upload("a", ["b", "c"]), states["a"])
    with pytest.raises(ValueError, match="8 residues"):
        client_mask(np.zeros(7, dtype=np.int64), states["a"])
    with pytest.raises(ValueError, match="outside"):
        client_mask(np.full(8, 2**16), states["a"])


def test_unmask_refuses_overlapping_lists_too_few_uploads_and_a_second_unmask():
    names = [f"c{i}" for i in range(4)]
    session, clients, _, requests = to_unmask(names, 16, SecureSumConfig(16, 3, 2))
    state = dict(clients["c0"].state)
    request = requests["c0"]
    with pytest.raises(ValueError, match="both active and dead"):
        client_unmask({**request, "dead": ["c1"]}, dict(state))
    with pytest.raises(ValueError, match="fewer than"):
        client_unmask({**request, "active": ["c0", "c1"], "dead": ["c2", "c3"]}, dict(state))
    with pytest.raises(ValueError, match="not parties"):
        client_unmask({**request, "dead": ["stranger"]}, dict(state))
    with pytest.raises(ValueError, match="another session"):
        client_unmask({**request, "session": bytes(16)}, dict(state))
    reply = client_unmask(request, state)
    assert reply["names"] == names and len(reply["shares"]) == 4
    with pytest.raises(ValueError, match="second unmask"):
        client_unmask({**request, "active": names[:3], "dead": ["c3"]}, state)  # would reveal c3's sk1 too
