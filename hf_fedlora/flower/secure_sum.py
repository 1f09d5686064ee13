"""Secure summation of the clients' encoded uploads: SecAgg (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017), on the complete graph, for an honest-but-curious server.

Under distributed noise (`hf_fedlora.privacy.distributed_noise`) each client uploads integers modulo 2^bits that
hold only its share of the noise, so the server must learn their sum and nothing else. Each client u adds a mask
to its upload: a self mask PRG(b_u) from a fresh seed, and for every other party v a pairwise mask +-PRG(s_uv)
from a key agreement (+ when u > v by name), so the pairwise masks cancel in the sum. Both secrets, b_u and the
key-agreement key sk1_u, are Shamir-shared (t of n) among the parties, relayed by the server under a second key
agreement. After the uploads the server asks the survivors for shares of each uploader's b (to remove the self
masks) and of each party that did not upload's sk1 (to remove its pairwise masks, which no longer cancel); a
client never gives both for one party. Four stages, with no transport here, so the Flower apps and the tests'
loopback run the same code:

- S0 setup: each client makes two key pairs (sk1/pk1 for the masks, sk2/pk2 for the share ciphertexts);
- S1 share: it draws b, Shamir-shares b and sk1, and encrypts one pair of shares for each other party;
- S2 upload: it decrypts the shares addressed to it (before training), then masks its encoded upload;
- S3 unmask: it returns a b-share of each uploader and an sk1-share of each party that did not upload.

The primitives are Flower's (SECP384R1 keys; ECDH + HKDF into Fernet, which authenticates; Shamir over GF(2^128)
from pycryptodome). The mask generator is our own AES-256-CTR stream: Flower's `pseudo_rand_gen` folds its seed to
32 bits (a curious server could brute-force a pairwise mask) and never draws M - 1. A session is 16 random bytes
per sub-round, bound into every key derivation and every share plaintext, so nothing replays into another
sub-round; each client's state is tagged with its session and stage and refuses anything out of order.

Threat model: the server follows the protocol; it and any t - 1 clients together learn nothing about the
survivors' uploads beyond their sum. A malicious server could send different unmask lists to different clients
(Bonawitz's signed consistency round would stop that; neither Flower nor this module has it).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

STAGES = ("setup", "share", "upload", "unmask")
SESSION_BYTES = 16
SEED_BYTES = 32
MAX_BITS = 62  # two residues add up below 2^63: the running sums stay in int64
MASK_INFO = b"hf_fedlora/secure_sum/mask/v1"
SHARE_TAG = b"hf_fedlora/secure_sum/share/v1"
SEED_TAG = b"hf_fedlora/secure_sum/seed/v1"

Exchange = Callable[[str, Mapping[str, Mapping[str, Any]], float], Mapping[str, Any]]


@dataclass(frozen=True)
class SecureSumConfig:
    """The public parameters of one secure sum."""

    bits: int  # the sum is modulo 2**bits (DistributedNoisePlan.bits)
    threshold: int  # t: shares that rebuild a secret (`default_threshold`)
    min_contributors: int  # n_min (DistributedNoisePlan.min_shares): the fewest uploads a released sum may hold
    stage_timeout: float = 60.0  # seconds for S0, S1 and S3 (S2 trains: the caller's round timeout)

    def __post_init__(self):
        _check_bits(self.bits)
        if self.threshold < 1 or self.min_contributors < 1:
            raise ValueError(f"threshold={self.threshold} and min_contributors={self.min_contributors} must be >= 1")
        if not self.stage_timeout > 0:
            raise ValueError(f"stage_timeout={self.stage_timeout} must be positive")

    @property
    def required(self) -> int:
        """The fewest parties every stage needs: t to rebuild the secrets, n_min for the privacy accounting."""
        return max(self.threshold, self.min_contributors)


class SecureSumAborted(RuntimeError):
    """Too few parties at some stage: the session stops, and nothing about any upload is revealed."""

    def __init__(self, message: str, stage: str = "", dropped: Mapping[str, str] | None = None):
        super().__init__(message)
        self.stage = stage  # where it stopped: "setup" | "share" | "upload" | "unmask"
        self.dropped = dict(dropped or {})  # name -> the stage it dropped out at


@dataclass
class SecureSumResult:
    total: np.ndarray  # int64 in [0, 2**bits): the sum of the contributors' uploads modulo 2**bits
    contributors: list[str]  # the parties whose uploads are in the total (U3), in roster order
    dropped: dict[str, str]  # name -> "setup" | "share" | "upload" | "unmask"; an "unmask" drop is a contributor
    reasons: dict[str, str] = field(default_factory=dict)  # name -> why its reply was refused, where it was


def default_threshold(n: int, min_contributors: int) -> int:
    """t = max(n_min, n // 2 + 1), at most n (and at least 1): a majority, and never fewer than a sum may hold."""
    return max(1, min(n, max(min_contributors, n // 2 + 1)))


def mask_stream(key: bytes, session: bytes, label: bytes, size: int, bits: int) -> np.ndarray:
    """`size` uniform residues modulo 2^bits (int64): AES-256-CTR under HKDF-SHA256(key; session, label).
    Each 64-bit word is cut to its low `bits` bits, which is exactly uniform for a power-of-2 modulus; the derived
    key serves one stream only, so the counter starts at zero."""
    _check_bits(bits)
    info = MASK_INFO + _frame(session, label)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)
    encryptor = Cipher(algorithms.AES(derived), modes.CTR(bytes(16))).encryptor()
    raw = encryptor.update(bytes(8 * int(size))) + encryptor.finalize()
    return (np.frombuffer(raw, dtype="<u8") & np.uint64((1 << bits) - 1)).astype(np.int64)


def modular_sum(vectors: Iterable[np.ndarray], bits: int) -> np.ndarray:
    """The plain sum modulo 2^bits (int64): what the secure sum reveals, and the in-process "simulated" sum."""
    total = None
    for vector in vectors:
        residues = _residues(vector, bits, None if total is None else total.size)
        total = residues if total is None else (total + residues) & ((1 << bits) - 1)
    if total is None:
        raise ValueError("a modular sum needs at least one vector")
    return total


def wire_dtype(bits: int) -> np.dtype:
    """The dtype a masked upload travels in: uint32 up to 32 bits (half the bytes of int64), uint64 above."""
    return np.dtype(np.uint32 if bits <= 32 else np.uint64)


# --- the client side: pure functions over a state dict that the ClientApp stores as one ConfigRecord -----------
def client_setup(request: Mapping[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """S0: two fresh key pairs for this session; whatever an earlier session left in `state` is forgotten."""
    _expect_action(request, "setup")
    session = _session(request)
    if state.get("session") == session:
        raise ValueError("secure sum: this session was set up already; a repeated setup is refused")
    name, names = _text(request, "name"), _names(request, "names")
    bits, threshold, min_contributors, size = (
        _int(request, key) for key in ("bits", "threshold", "min_contributors", "size")
    )
    _check_bits(bits)
    if name not in names:
        raise ValueError(f"secure sum: {name!r} is not in the roster {names}")
    if not 1 <= threshold <= len(names) or min_contributors < 1 or size < 1:
        raise ValueError(f"secure sum: bad parameters t={threshold}, n_min={min_contributors}, size={size}")
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    new = {
        "session": session,
        "stage": "setup",
        "name": name,
        "roster": names,
        "bits": bits,
        "threshold": threshold,
        "min_contributors": min_contributors,
        "size": size,
        "sk1": private_key_to_bytes(sk1),
        "sk2": private_key_to_bytes(sk2),
        "pk1": public_key_to_bytes(pk1),
        "pk2": public_key_to_bytes(pk2),
    }
    state.clear()
    state.update(new)
    return {"session": session, "pk1": new["pk1"], "pk2": new["pk2"]}


def client_share_keys(request: Mapping[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """S1: draw the self-mask seed b, Shamir-share b and sk1 among U1 (t of |U1|), and encrypt each other party's
    pair of shares under ECDH(sk2, its pk2), bound to source, destination and session."""
    session = _expect(request, state, "share", "setup")
    me = state["name"]
    names, pk1s, pk2s = _names(request, "names"), _blobs(request, "pk1s"), _blobs(request, "pk2s")
    if not len(names) == len(pk1s) == len(pk2s):
        raise ValueError("secure sum: the share request's names and keys differ in length")
    if not set(names) <= set(state["roster"]):
        raise ValueError(f"secure sum: {sorted(set(names) - set(state['roster']))} are not in the roster")
    if me not in names or pk1s[names.index(me)] != state["pk1"] or pk2s[names.index(me)] != state["pk2"]:
        raise ValueError(f"secure sum: {me!r} is not listed with its own keys")
    if len(set(pk1s) | set(pk2s)) != 2 * len(names):
        raise ValueError("secure sum: the public keys are not all distinct")
    _check_enough(len(names), state, "parties with keys")
    sk2 = bytes_to_private_key(state["sk2"])
    pk2_keys = [_public_key(pk) for pk in pk2s]  # every key parses before anything secret is made
    for pk in pk1s:
        _public_key(pk)
    seed = os.urandom(SEED_BYTES)
    threshold = state["threshold"]
    seed_shares = create_shares(seed, threshold, len(names))
    sk1_shares = create_shares(state["sk1"], threshold, len(names))
    dsts, ctxts = [], []
    for index, other in enumerate(names):
        if other == me:
            continue
        plaintext = _frame(SHARE_TAG, me.encode(), other.encode(), session, seed_shares[index], sk1_shares[index])
        dsts.append(other)
        ctxts.append(encrypt(generate_shared_key(sk2, pk2_keys[index]), plaintext))
    mine = names.index(me)
    state.update(
        stage="share",
        parties=names,
        pk1s=pk1s,
        pk2s=pk2s,
        seed=seed,
        own_seed_share=seed_shares[mine],
        own_sk1_share=sk1_shares[mine],
    )
    return {"session": session, "dsts": dsts, "ctxts": ctxts, "seed_hash": _seed_hash(session, me, seed)}


def client_receive_shares(request: Mapping[str, Any], state: dict[str, Any]) -> None:
    """S2, before training: decrypt the shares the other parties of U2 sent; each must name its source, this
    client and this session. A refusal here costs no privacy: nothing was trained yet."""
    session = _expect(request, state, "upload", "share")
    me = state["name"]
    srcs, ctxts = _names(request, "srcs"), _blobs(request, "ctxts")
    if len(srcs) != len(ctxts):
        raise ValueError("secure sum: the upload request's sources and ciphertexts differ in length")
    if me in srcs or not set(srcs) <= set(state["parties"]):
        raise ValueError("secure sum: the sources are not other parties of this session")
    _check_enough(len(srcs) + 1, state, "parties that shared keys")
    sk2 = bytes_to_private_key(state["sk2"])
    seed_shares, sk1_shares = [], []
    for src, ctxt in zip(srcs, ctxts, strict=True):
        pk2 = bytes_to_public_key(state["pk2s"][state["parties"].index(src)])
        try:
            fields = _unframe(decrypt(generate_shared_key(sk2, pk2), ctxt))
        except (InvalidToken, ValueError) as error:
            raise ValueError(f"secure sum: the shares from {src!r} do not decrypt") from error
        if len(fields) != 6 or fields[:4] != [SHARE_TAG, src.encode(), me.encode(), session]:
            raise ValueError(f"secure sum: the shares from {src!r} are not addressed to {me!r} in this session")
        seed_shares.append(fields[4])
        sk1_shares.append(fields[5])
    state.update(stage="received", srcs=srcs, seed_shares=seed_shares, sk1_shares=sk1_shares)


def client_mask(upload: np.ndarray, state: dict[str, Any]) -> np.ndarray:
    """S2, after encoding: y = x + PRG(b) + sum_v +-PRG(ECDH(sk1, pk1_v)) mod 2^bits over the sources v (int64).
    The seed b and the private keys are forgotten here: from now on only the shares are needed."""
    if state.get("stage") != "received":
        raise ValueError(f"secure sum: nothing to mask with at stage {state.get('stage')!r} (expected 'received')")
    bits, size, session, me = state["bits"], state["size"], state["session"], state["name"]
    modulus_mask = (1 << bits) - 1
    masked = _residues(upload, bits, size) + mask_stream(state["seed"], session, b"self", size, bits)
    sk1 = bytes_to_private_key(state["sk1"])
    for src in state["srcs"]:
        pk1 = bytes_to_public_key(state["pk1s"][state["parties"].index(src)])
        pair = mask_stream(generate_shared_key(sk1, pk1), session, b"pair", size, bits)
        masked = (masked + pair if me > src else masked - pair) & modulus_mask
    for key in ("seed", "sk1", "sk2"):
        state.pop(key)
    state["stage"] = "masked"
    return masked & modulus_mask


def client_unmask(request: Mapping[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """S3: a b-share of each uploader (`active`) and an sk1-share of each party that did not upload (`dead`), never
    both of one party, once per session; then everything secret is forgotten."""
    session = _session(request)
    if state.get("stage") == "done" and state.get("session") == session:
        raise ValueError("secure sum: this session was unmasked already; a second unmask is refused")
    _expect(request, state, "unmask", "masked")
    me, srcs = state["name"], state["srcs"]
    active, dead = _names(request, "active"), _names(request, "dead")
    if set(active) & set(dead):
        raise ValueError(f"secure sum: {sorted(set(active) & set(dead))} are listed both active and dead")
    if me not in active or not set(active) | set(dead) <= set(srcs) | {me}:
        raise ValueError("secure sum: the unmask lists are not parties this client masked with")
    _check_enough(len(active), state, "uploads")
    shares = [state["own_seed_share"] if name == me else state["seed_shares"][srcs.index(name)] for name in active]
    shares += [state["sk1_shares"][srcs.index(name)] for name in dead]
    name = state["name"]
    state.clear()
    state.update(session=session, stage="done", name=name)
    return {"session": session, "names": active + dead, "shares": shares}


# --- the server side: a state machine with no transport ---------------------------------------------------------
class SecureSumSession:
    """The server's half of one secure sum: the requests of each stage, and what it keeps from the replies.
    A missing or malformed reply is a dropout at that stage; too few parties raise `SecureSumAborted`."""

    def __init__(self, names: Sequence[str], size: int, config: SecureSumConfig, session: bytes | None = None):
        self.names = list(names)
        if len(set(self.names)) != len(self.names) or not all(isinstance(n, str) and n for n in self.names):
            raise ValueError(f"secure sum: the parties must be distinct non-empty names, got {self.names}")
        if size < 1:
            raise ValueError(f"secure sum: size={size} must be positive")
        self.size = int(size)
        self.config = config
        self.session = os.urandom(SESSION_BYTES) if session is None else session
        if not isinstance(self.session, bytes) or len(self.session) < SESSION_BYTES:
            raise ValueError(f"secure sum: a session is at least {SESSION_BYTES} random bytes")
        self.dropped: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self._stage = "setup"
        self._pk1: dict[str, bytes] = {}
        self._pk2: dict[str, bytes] = {}
        self._seed_hashes: dict[str, bytes] = {}
        self._ctxts: dict[tuple[str, str], bytes] = {}
        self._u1: list[str] = []
        self._u2: list[str] = []
        self._u3: list[str] = []
        self._sum: np.ndarray | None = None
        if len(self.names) < config.required:
            self._abort("setup", f"{len(self.names)} parties, fewer than max(t, n_min) = {config.required}")

    @property
    def modulus_mask(self) -> int:
        return (1 << self.config.bits) - 1

    def setup_requests(self) -> dict[str, dict[str, Any]]:
        self._at("setup")
        common = {"action": "setup", "session": self.session, "bits": self.config.bits, "size": self.size}
        common.update(threshold=self.config.threshold, min_contributors=self.config.min_contributors)
        return {name: {**common, "name": name, "names": list(self.names)} for name in self.names}

    def accept_keys(self, replies: Mapping[str, Mapping[str, Any]]) -> None:
        """U1: the parties whose two public keys arrived, parse, and are unique."""
        self._at("setup")
        keys = {}
        for name in self.names:
            try:
                reply = self._reply(replies, name)
                keys[name] = (_blob(reply, "pk1"), _blob(reply, "pk2"))
                for pk in keys[name]:
                    _public_key(pk)
            except ValueError as error:
                keys.pop(name, None)
                self._drop(name, "setup", str(error))
        seen: dict[bytes, list[str]] = {}
        for name, pair in keys.items():
            for pk in pair:
                seen.setdefault(pk, []).append(name)
        for name in {name for owners in seen.values() if len(owners) > 1 for name in owners}:
            keys.pop(name)
            self._drop(name, "setup", "a public key another party also sent")
        self._u1 = [name for name in self.names if name in keys]
        self._pk1 = {name: keys[name][0] for name in self._u1}
        self._pk2 = {name: keys[name][1] for name in self._u1}
        self._need(len(self._u1), "setup", "parties with keys")
        self._stage = "share"

    def share_requests(self) -> dict[str, dict[str, Any]]:
        self._at("share")
        pk1s, pk2s = [self._pk1[n] for n in self._u1], [self._pk2[n] for n in self._u1]
        request = {"action": "share", "session": self.session}
        return {name: {**request, "names": list(self._u1), "pk1s": list(pk1s), "pk2s": list(pk2s)} for name in self._u1}

    def accept_shares(self, replies: Mapping[str, Mapping[str, Any]]) -> None:
        """U2: the parties that sent one ciphertext for every other party of U1. Below max(t, n_min) it aborts,
        before any client has trained."""
        self._at("share")
        for src in self._u1:
            try:
                reply = self._reply(replies, src)
                dsts, ctxts, seed_hash = _names(reply, "dsts"), _blobs(reply, "ctxts"), _blob(reply, "seed_hash")
                if len(dsts) != len(ctxts) or set(dsts) != set(self._u1) - {src} or len(seed_hash) != 32:
                    raise ValueError("its ciphertexts do not cover the other parties")
            except ValueError as error:
                self._drop(src, "share", str(error))
                continue
            self._u2.append(src)
            self._seed_hashes[src] = seed_hash
            self._ctxts.update({(src, dst): ctxt for dst, ctxt in zip(dsts, ctxts, strict=True)})
        self._need(len(self._u2), "share", "parties that shared keys")
        self._sum = np.zeros(self.size, dtype=np.int64)
        self._stage = "upload"

    def upload_requests(self) -> dict[str, dict[str, Any]]:
        """Per party of U2: the ciphertexts the other parties of U2 addressed to it, and their names."""
        self._at("upload")
        requests = {}
        for dst in self._u2:
            srcs = [src for src in self._u2 if src != dst]
            ctxts = [self._ctxts[(src, dst)] for src in srcs]
            requests[dst] = {"action": "upload", "session": self.session, "srcs": srcs, "ctxts": ctxts}
        return requests

    def accept_upload(self, name: str, masked: np.ndarray) -> None:
        """Add one masked upload to the running sum (streaming: nothing else of it is kept). Raises ValueError for
        a party not asked, a second upload, or a malformed vector, and then adds nothing."""
        self._at("upload")
        if name not in self._u2 or name in self._u3:
            raise ValueError(f"secure sum: no upload expected from {name!r}")
        try:
            residues = _residues(masked, self.config.bits, self.size)
        except ValueError as error:
            self.reasons[name] = f"upload: {error}"
            raise
        self._sum = (self._sum + residues) & self.modulus_mask
        self._u3.append(name)

    def unmask_requests(self) -> dict[str, dict[str, Any]]:
        """To each uploader: who uploaded (active) and who of U2 did not (dead). Below max(t, n_min) uploads it
        aborts: no share is asked for, so the masked sum stays masked."""
        if self._stage == "upload":
            self._u3 = [name for name in self._u2 if name in self._u3]  # roster order
            for name in self._u2:
                if name not in self._u3:
                    self._drop(name, "upload", self.reasons.get(name, "no upload"))
            self._need(len(self._u3), "upload", "uploads")
            self._stage = "unmask"
        self._at("unmask")
        dead = [name for name in self._u2 if name not in self._u3]
        request = {"action": "unmask", "session": self.session}
        return {name: {**request, "active": list(self._u3), "dead": list(dead)} for name in self._u3}

    def finish(self, replies: Mapping[str, Mapping[str, Any]]) -> SecureSumResult:
        """Rebuild each uploader's b and each dead party's sk1 from >= t replies, checking every rebuilt secret
        against what its owner sent (b's hash, pk1), and remove the masks: sum over U3 of x mod 2^bits."""
        self._at("unmask")
        active, dead = self._u3, [name for name in self._u2 if name not in self._u3]
        expected = active + dead
        shares: list[list[bytes]] = []
        for name in active:
            try:
                reply = self._reply(replies, name)
                if _names(reply, "names") != expected or len(_blobs(reply, "shares")) != len(expected):
                    raise ValueError("its shares are not for the parties asked")
            except ValueError as error:
                self._drop(name, "unmask", str(error))
                continue
            shares.append(list(reply["shares"]))
        if len(shares) < self.config.threshold:
            self._abort("unmask", f"{len(shares)} unmask replies, fewer than t = {self.config.threshold}")
        total = self._sum
        bits, size, session = self.config.bits, self.size, self.session
        for index, name in enumerate(active):
            seed = self._rebuild([reply[index] for reply in shares], name)
            if _seed_hash(session, name, seed) != self._seed_hashes[name]:
                self._abort("unmask", f"the rebuilt mask seed of {name!r} does not match its hash")
            total = (total - mask_stream(seed, session, b"self", size, bits)) & self.modulus_mask
        for index, name in enumerate(dead, start=len(active)):
            pem = self._rebuild([reply[index] for reply in shares], name)
            try:
                sk1 = bytes_to_private_key(pem)
                matches = public_key_to_bytes(sk1.public_key()) == self._pk1[name]
            except (ValueError, TypeError):
                matches = False
            if not matches:
                self._abort("unmask", f"the rebuilt key of {name!r} is not the one it announced")
            for other in active:  # the pairwise masks `other` added with `name`, which no upload cancels
                pair = mask_stream(
                    generate_shared_key(sk1, bytes_to_public_key(self._pk1[other])), session, b"pair", size, bits
                )
                total = (total - pair if other > name else total + pair) & self.modulus_mask
        self._stage, self._sum, self._ctxts = "done", None, {}
        return SecureSumResult(total, list(active), dict(self.dropped), dict(self.reasons))

    # --- bookkeeping
    def _at(self, stage: str) -> None:
        if self._stage != stage:
            raise RuntimeError(f"secure sum: the session is at {self._stage!r}, not {stage!r}")

    def _reply(self, replies: Mapping[str, Mapping[str, Any]], name: str) -> Mapping[str, Any]:
        reply = replies.get(name)
        if reply is None:
            raise ValueError("no reply")
        if reply.get("session") != self.session:
            raise ValueError("a reply for another session")
        return reply

    def _drop(self, name: str, stage: str, reason: str) -> None:
        self.dropped[name] = stage
        self.reasons[name] = f"{stage}: {reason}" if not reason.startswith(f"{stage}:") else reason

    def _need(self, count: int, stage: str, what: str) -> None:
        if count < self.config.required:
            self._abort(stage, f"{count} {what}, fewer than max(t, n_min) = {self.config.required}")

    def _abort(self, stage: str, message: str) -> None:
        self._stage, self._sum, self._ctxts = "aborted", None, {}
        raise SecureSumAborted(f"secure sum aborted at {stage}: {message}", stage, self.dropped)

    def _rebuild(self, shares: list[bytes], owner: str) -> bytes:
        """Shamir's combine, on shares checked to be well formed and distinct; its own padding check is weak."""
        lengths = {len(share) for share in shares}
        indices = {share[:4] for share in shares}
        if len(lengths) != 1 or (lengths.pop() - 4) % 16 or len(indices) != len(shares):
            self._abort("unmask", f"malformed shares of {owner!r}")
        try:
            return combine_shares(shares)
        except (ValueError, IndexError):
            self._abort("unmask", f"the shares of {owner!r} do not combine")


def run_secure_sum(
    session: SecureSumSession, exchange: Exchange, upload: Exchange, upload_timeout: float | None = None
) -> SecureSumResult:
    """Drive the four stages: `exchange(stage, requests, timeout)` for S0, S1 and S3, `upload("upload", requests,
    timeout)` for S2 ({name: masked vector}); a name absent from a reply mapping dropped out at that stage."""
    timeout = session.config.stage_timeout
    session.accept_keys(exchange("setup", session.setup_requests(), timeout))
    session.accept_shares(exchange("share", session.share_requests(), timeout))
    uploads = upload("upload", session.upload_requests(), timeout if upload_timeout is None else upload_timeout)
    for name, masked in uploads.items():
        try:
            session.accept_upload(name, masked)
        except ValueError:
            pass  # a dropout at upload (recorded in session.reasons when it was a party)
    return session.finish(exchange("unmask", session.unmask_requests(), timeout))


# --- a loopback transport for tests -------------------------------------------------------------------------------
class LoopbackClient:
    """One party in process: its own state dict, stored between stages as the ClientApp stores it (a flwr
    ConfigRecord, through its protobuf form), and its private upload."""

    def __init__(self, name: str, upload: np.ndarray):
        self.name = name
        self.upload = np.asarray(upload)
        self.state: dict[str, Any] = {}
        self.stages: list[str] = []  # the stages it ran, refusals included
        self.errors: list[str] = []  # its refusals

    def __call__(self, stage: str, request: Mapping[str, Any]) -> Any:
        self.stages.append(stage)
        state, request = _stored(self.state), _stored(request)
        if stage == "upload":
            client_receive_shares(request, state)
            reply = client_mask(self.upload, state).astype(wire_dtype(state["bits"]))
        else:
            steps = {"setup": client_setup, "share": client_share_keys, "unmask": client_unmask}
            reply = _stored(steps[stage](request, state))
        self.state = _stored(state)
        return reply


def loopback_exchange(clients: Mapping[str, Callable[..., Any]], drop: Mapping[str, str] | None = None) -> Exchange:
    """An Exchange over in-process clients (`client(stage, request) -> reply`) for every stage, upload included.
    `drop`: name -> the stage whose reply is lost (the client did the work); a client that refuses (ValueError)
    sends no reply either, as a ClientApp's error reply reads."""
    drop = dict(drop or {})

    def exchange(stage: str, requests: Mapping[str, Mapping[str, Any]], timeout: float) -> dict[str, Any]:
        replies = {}
        for name, request in requests.items():
            try:
                reply = clients[name](stage, request)
            except ValueError as error:
                if isinstance(clients[name], LoopbackClient):
                    clients[name].errors.append(f"{stage}: {error}")
                continue
            if drop.get(name) != stage:
                replies[name] = reply
        return replies

    return exchange


# --- helpers -----------------------------------------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"secure sum: bits={bits!r} must be an int in [1, {MAX_BITS}]")


def _residues(vector: Any, bits: int, size: int | None) -> np.ndarray:
    """A vector as int64 residues in [0, 2^bits), refused (not reduced) when out of range: an encoder bug must not
    pass silently."""
    array = np.asarray(vector)
    if array.ndim != 1 or array.dtype.kind not in "iu" or (size is not None and array.size != size):
        raise ValueError(f"expected a 1-D integer vector of {size} residues, got {array.dtype} {array.shape}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= 1 << bits):
        raise ValueError(f"values outside [0, 2^{bits})")
    return array.astype(np.int64)


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: unambiguous, so no two field lists encode alike."""
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def _unframe(data: bytes) -> list[bytes]:
    parts, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ValueError("truncated frame")
        (length,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise ValueError("truncated frame")
        parts.append(data[offset : offset + length])
        offset += length
    return parts


def _seed_hash(session: bytes, name: str, seed: bytes) -> bytes:
    """A commitment to b, so the server can tell a wrongly rebuilt seed (Shamir alone cannot); b is 32 random bytes,
    so its hash tells nothing about it."""
    return hashlib.sha256(_frame(SEED_TAG, session, name.encode(), seed)).digest()


def _expect_action(request: Mapping[str, Any], action: str) -> None:
    if request.get("action") != action:
        raise ValueError(f"secure sum: expected a {action!r} request, got {request.get('action')!r}")


def _expect(request: Mapping[str, Any], state: Mapping[str, Any], action: str, stage: str) -> bytes:
    """The request's session, after checking it is this client's session and the client is at `stage`."""
    _expect_action(request, action)
    session = _session(request)
    if state.get("session") != session:
        raise ValueError(f"secure sum: the {action!r} request is for another session than this client's")
    if state.get("stage") != stage:
        raise ValueError(f"secure sum: a {action!r} request at stage {state.get('stage')!r} (expected {stage!r})")
    return session


def _check_enough(count: int, state: Mapping[str, Any], what: str) -> None:
    required = max(state["threshold"], state["min_contributors"])
    if count < required:
        raise ValueError(f"secure sum: {count} {what}, fewer than max(t, n_min) = {required}")


def _session(request: Mapping[str, Any]) -> bytes:
    session = request.get("session")
    if not isinstance(session, bytes) or len(session) < SESSION_BYTES:
        raise ValueError("secure sum: the request carries no valid session")
    return session


def _public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """A party's public key: PEM, on the curve Flower's key pairs use (SECP384R1)."""
    try:
        key = bytes_to_public_key(pem)
    except (ValueError, TypeError) as error:
        raise ValueError("secure sum: a public key does not parse") from error
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ValueError("secure sum: a public key is not on SECP384R1")
    return key


def _int(values: Mapping[str, Any], key: str) -> int:
    value = values.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"secure sum: {key!r} must be an int")
    return value


def _text(values: Mapping[str, Any], key: str) -> str:
    value = values.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"secure sum: {key!r} must be a non-empty str")
    return value


def _blob(values: Mapping[str, Any], key: str) -> bytes:
    value = values.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"secure sum: {key!r} must be bytes")
    return value


def _names(values: Mapping[str, Any], key: str) -> list[str]:
    names = values.get(key)
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"secure sum: {key!r} must be a list of names")
    if len(set(names)) != len(names):
        raise ValueError(f"secure sum: {key!r} lists a name twice")
    return list(names)


def _blobs(values: Mapping[str, Any], key: str) -> list[bytes]:
    blobs = values.get(key)
    if not isinstance(blobs, list | tuple) or not all(isinstance(blob, bytes) for blob in blobs):
        raise ValueError(f"secure sum: {key!r} must be a list of bytes")
    return list(blobs)


def _stored(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` as read back from a flwr ConfigRecord (which also refuses any value it cannot hold)."""
    from flwr.app import ConfigRecord
    from flwr.common.serde import config_record_from_proto, config_record_to_proto

    return dict(config_record_from_proto(config_record_to_proto(ConfigRecord(dict(values)))))
