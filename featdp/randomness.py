"""Random bits for the releases: 256-bit keys, AES-256-CTR streams, and exact Bernoulli draws.

* A `RootKey` is 32 bytes. Unseeded, they are read from the OS's cryptographic source
  (`secrets.token_bytes`, i.e. getrandom/urandom); seeded, they are SHA-256 of the seed's decimal digits,
  so a seed of any size is hashed in whole and never truncated (two seeds give the same key only if
  SHA-256 collides).
* Child keys are HMAC-SHA256(parent, label): each release, each class of a stack and each Poisson mask
  block gets its own key, so no two draws ever share bits.
* A key's `stream()` is its AES-256-CTR keystream (`cryptography`, i.e. OpenSSL with AES-NI): a CSPRNG in
  the sense of NIST SP 800-90A's CTR_DRBG, fast enough (GB/s) to feed millions of noise coordinates.
  Unseeded, every bit of noise is thus a deterministic function of 256 bits the OS gave, and of nothing else.
* `bernoulli` draws Bernoulli(q) exactly for any float q (a dyadic rational): uniform words are compared
  with q's binary expansion word by word, and a tie (probability 2⁻⁶⁴ per word) draws the next word.
"""

from __future__ import annotations

import dataclasses
import fractions
import hashlib
import hmac
import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
_SEED_DOMAIN = b"featdp seed v1:"
_CHUNK_WORDS = 1 << 20  # keystream is produced 8 MiB at a time


@dataclasses.dataclass(frozen=True)
class RootKey:
    """256 bits from which all randomness of one run is derived."""

    material: bytes
    seeded: bool = False

    def __post_init__(self):
        if not isinstance(self.material, bytes) or len(self.material) != KEY_BYTES:
            raise ValueError(f"a key is {KEY_BYTES} bytes, got {self.material!r:.40}")

    def __repr__(self) -> str:  # never print key material into logs or reports
        return f"RootKey(seeded={self.seeded})"

    @classmethod
    def from_os(cls) -> "RootKey":
        return cls(secrets.token_bytes(KEY_BYTES), seeded=False)

    @classmethod
    def from_seed(cls, seed: int) -> "RootKey":
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"a seed is an integer, got {seed!r}")
        return cls(hashlib.sha256(_SEED_DOMAIN + str(int(seed)).encode()).digest(), seeded=True)

    def child(self, *labels: object) -> "RootKey":
        """An independent key for the labelled purpose (labels are joined with '/')."""
        message = "/".join(str(label) for label in labels).encode()
        return RootKey(hmac.new(self.material, message, hashlib.sha256).digest(), self.seeded)

    def stream(self) -> "BitStream":
        return BitStream(self.material)


def make_key(seed: int | None) -> RootKey:
    """The root key of a run: from the OS's cryptographic source, or from `seed` (any integer) if given."""
    return RootKey.from_os() if seed is None else RootKey.from_seed(seed)


class BitStream:
    """Uniform 64-bit words from the AES-256-CTR keystream of one key, consumed in order."""

    def __init__(self, material: bytes):
        self._encryptor = Cipher(algorithms.AES(material), modes.CTR(bytes(16))).encryptor()
        self.words_drawn = 0

    def words(self, count: int) -> np.ndarray:
        """`count` independent uniform uint64 words."""
        out = np.empty(int(count), dtype=np.uint64)
        view = memoryview(out).cast("B")
        for start in range(0, out.nbytes, 8 * _CHUNK_WORDS):
            stop = min(out.nbytes, start + 8 * _CHUNK_WORDS)
            self._encryptor.update_into(_zeros(stop - start), view[start:stop])
        self.words_drawn += int(count)
        return out


_ZEROS = bytes(8 * _CHUNK_WORDS + 16)


def _zeros(length: int) -> memoryview:
    return memoryview(_ZEROS)[:length]


def bernoulli(stream: BitStream, probability: float, size: int) -> np.ndarray:
    """`size` independent draws of Bernoulli(`probability`), exactly: P(True) is the float's exact value."""
    q = fractions.Fraction(probability)
    if not 0 <= q <= 1:
        raise ValueError(f"a probability lies in [0, 1], got {probability!r}")
    if q == 1:
        return np.ones(size, dtype=bool)
    if q == 0:
        return np.zeros(size, dtype=bool)
    # q = numerator / 2^b exactly; its binary expansion, 64 bits a word, has ceil(b / 64) words.
    bits = q.denominator.bit_length() - 1
    word_count = -(-bits // 64)
    expansion = q.numerator << (64 * word_count - bits)
    digits = [(expansion >> (64 * (word_count - 1 - i))) & (2**64 - 1) for i in range(word_count)]
    out = np.zeros(size, dtype=bool)
    undecided = np.arange(size)
    for digit in digits:
        if undecided.size == 0:
            break
        draw = stream.words(undecided.size)
        out[undecided[draw < np.uint64(digit)]] = True
        undecided = undecided[draw == np.uint64(digit)]
    return out  # still tied after the last word: u ≥ q, False
