"""What every Triton kernel of the package shares: triton itself (or a stand-in), availability, argument
checks, and the device functions of the random stream.

The stream is the one defined in ``localvol_fast/core/philox.py`` (the ground truth, read its docstring):

    key     = (seed mod 2^32, floor(seed / 2^32))
    counter = (block mod 2^32, floor(block / 2^32), i mod 2^32, floor(i / 2^32)),  block = floor(j / 4)
    (x0, x1, x2, x3) = Philox-4x32-10(counter, key)
    u(x)    = (floor(x / 2^8) + 0.5) * 2^-24
    lanes 0, 1 = rho cos(phi), rho sin(phi)  with rho = sqrt(-2 log u(x0)), phi = u(x1) * float32(2 pi)
    lanes 2, 3 = the same from (x2, x3);     element j of direction i = lane j mod 4 of its block.

The Philox rounds are written out here in uint32 arithmetic (``tl.umulhi`` for the high word), so the
words are bit-identical to the reference; ``tl.rand``/``tl.randn``/``tl.philox`` lay out their counters
differently and are not used. The Gaussians go through ``tl.log``/``tl.cos``/``tl.sin`` (libdevice's
``logf``/``cosf``/``sinf`` on NVIDIA GPUs) and ``tl.sqrt_rn`` (IEEE; ``tl.sqrt`` is the fast
approximation), so they agree with the reference to a few float32 ulp.

Device functions (imported by the kernels in ``stream``, ``directions``, ``kl`` and ``linear``):

- ``philox_4x32_10(c0, c1, c2, c3, k0, k1)``: the four uint32 output words.
- ``box_muller(x_radius, x_angle)``: the two float32 Gaussians of one word pair.
- ``gaussian_block(block, index_lo, index_hi, key_lo, key_hi)``: the four Gaussians of int64 ``block``.
- ``gaussian_element(element, index_lo, index_hi, key_lo, key_hi)``: element-wise Gaussians at int64
  stream positions of any shape (each computes its whole block; for tiles that are not block aligned).
- ``select_lane(lane, v0, v1, v2, v3)``: builds a (BLOCKS, 4) tile from four (BLOCKS,) lanes.
- ``stream_tile(...)``: a (BLOCKS, 4) tile of Gaussians with its columns and in-range mask.
- ``float32_to_bfloat16(x)``: round to nearest even on every backend (the interpreter truncates).

Availability: ``is_available()`` says whether these kernels can run here: triton imports, and either a
CUDA device exists or the interpreter is on. Triton reads ``TRITON_INTERPRET`` when each ``@triton.jit``
function is defined, its own helpers (``tl.sum``, ``tl.zeros_like``, ...) included, so for the
interpreter the variable must be set before ``triton`` is first imported in the process (note that
``torch._dynamo`` imports it). The module imports without triton; the launchers then raise.
"""

import os

import torch

from localvol_fast.core.philox import seed_to_key

try:
    import triton
    import triton.language as tl
except ImportError as _error:  # the package stays importable without triton; is_available() says False
    _TRITON_IMPORT_ERROR: ImportError | None = _error

    class _MissingTriton:
        """Stand-in so that the kernel definitions below import; they are never launched without triton."""

        @staticmethod
        def jit(fn=None, **_options):
            return fn if fn is not None else (lambda function: function)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    class _MissingLanguage:
        constexpr = staticmethod(lambda value=None: value)

    triton, tl = _MissingTriton(), _MissingLanguage()
else:
    _TRITON_IMPORT_ERROR = None


def interpreter_requested() -> bool:
    # the same reading of the variable as triton's own knob
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def _standard_library_interpreted() -> bool:
    # triton's own helpers (tl.sum, tl.max, tl.zeros_like, ...) are @triton.jit functions too, given
    # their mode when triton.language was first imported
    return _TRITON_IMPORT_ERROR is None and type(tl.zeros_like).__name__ == "InterpretedFunction"


# Whether the @triton.jit functions of this import are interpreted (decided once, at definition time),
# and whether triton's helpers were defined in the same mode (they are unless triton was imported
# before TRITON_INTERPRET was set, or the variable changed in between: then nothing can run).
_INTERPRET_AT_IMPORT = _TRITON_IMPORT_ERROR is None and interpreter_requested()
_MODES_AGREE = _TRITON_IMPORT_ERROR is None and _INTERPRET_AT_IMPORT == _standard_library_interpreted()
KERNELS_INTERPRETED = _INTERPRET_AT_IMPORT and _MODES_AGREE


def is_available() -> bool:
    """True when the Triton kernels can run: triton imports and a CUDA device exists or the interpreter is on.

    "Interpreter on" means ``TRITON_INTERPRET=1`` was set before ``triton`` was first imported in this
    process (triton fixes the mode of each @triton.jit function, its own helpers included, when it is
    defined); the kernels then run on CPU tensors.
    """
    if _TRITON_IMPORT_ERROR is not None or not _MODES_AGREE:
        return False
    return KERNELS_INTERPRETED or torch.cuda.is_available()


def check_inputs_device(*tensors: torch.Tensor | None) -> torch.device:
    """The common device of ``tensors``; raises a ValueError that says how to fix a wrong one."""
    if _TRITON_IMPORT_ERROR is not None:
        raise ImportError(
            "the Triton kernels of localvol_fast need triton: pip install 'localvol_fast[triton]' "
            f"(import failed with: {_TRITON_IMPORT_ERROR})"
        )
    if not _MODES_AGREE:
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET was set (or it changed since), so its helpers and "
            "these kernels were defined in different modes; set TRITON_INTERPRET=1 (CPU) or leave it unset "
            "(CUDA) before anything imports triton (torch._dynamo does)"
        )
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = present[0].device
    if not KERNELS_INTERPRETED and device.type != "cuda":
        raise ValueError(
            f"the compiled Triton kernels need CUDA tensors, got tensors on {device}; move them to a GPU, "
            "or set TRITON_INTERPRET=1 before triton is first imported to run them on CPU (interpreter)"
        )
    return device


def key_words(seed: int) -> tuple[int, int]:
    """The Philox key (low, high) of a seed in [0, 2^64), as Python ints for the kernels."""
    return seed_to_key(seed)


def as_indices(indices, device=None) -> torch.Tensor:
    """Direction indices as a contiguous int64 (B,) tensor (a list goes to ``device``); raises on negative
    ones held on the CPU. On a GPU the check would wait for the device, so there (as in the CUDA
    kernels) a negative index is read as its uint64 bits."""
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(indices, dtype=torch.int64, device=device)
    indices = indices.to(torch.int64).reshape(-1).contiguous()
    if indices.device.type == "cpu" and indices.numel() and int(indices.min()) < 0:
        raise ValueError(f"direction indices must be non-negative, got {int(indices.min())}")
    return indices


def check_range(start: int, length: int) -> tuple[int, int]:
    start, length = int(start), int(length)
    if start < 0 or length < 0:
        raise ValueError(f"start and length must be non-negative, got start={start}, length={length}")
    return start, length


# ------------------------------------------------------------------------------------------------
# Device functions
# ------------------------------------------------------------------------------------------------

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)
TWO_PI_F32 = tl.constexpr(6.2831854820251465)  # float32(2 pi): every backend multiplies by this number
TWO_POW_MINUS_24 = tl.constexpr(5.9604644775390625e-08)


@triton.jit
def philox_4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on uint32 tensors of one shape (Random123 constants); returns the four words."""
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def uniform_from_bits(x):
    """float32 uniform in (0, 1) of uint32 words: (floor(x / 2^8) + 0.5) * 2^-24 (exact)."""
    return ((x >> 8).to(tl.float32) + 0.5) * TWO_POW_MINUS_24


@triton.jit
def box_muller(x_radius, x_angle):
    """Two float32 standard normals (rho cos phi, rho sin phi) from two uint32 words."""
    rho = tl.sqrt_rn(-2.0 * tl.log(uniform_from_bits(x_radius)))
    phi = uniform_from_bits(x_angle) * TWO_PI_F32
    return rho * tl.cos(phi), rho * tl.sin(phi)


@triton.jit
def key_to_uint32(key_lo, key_hi):
    """The key words (kernel int arguments in [0, 2^32)) as uint32 scalars."""
    return key_lo.to(tl.uint32), key_hi.to(tl.uint32)


@triton.jit
def index_to_uint32(index):
    """(low, high) uint32 words of an int64 direction index."""
    return index.to(tl.uint32), (index >> 32).to(tl.uint32)


@triton.jit
def philox_block(block, index_lo, index_hi, key_lo, key_hi):
    """The four uint32 words of int64 ``block`` (any shape) of the direction (index_hi, index_lo)."""
    c0 = block.to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + index_lo
    c3 = tl.zeros_like(c0) + index_hi
    return philox_4x32_10(c0, c1, c2, c3, key_lo, key_hi)


@triton.jit
def gaussian_block(block, index_lo, index_hi, key_lo, key_hi):
    """The four float32 Gaussians (lanes 0..3) of int64 ``block`` (any shape)."""
    x0, x1, x2, x3 = philox_block(block, index_lo, index_hi, key_lo, key_hi)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return z0, z1, z2, z3


@triton.jit
def gaussian_element(element, index_lo, index_hi, key_lo, key_hi):
    """float32 Gaussians at int64 stream positions ``element`` (any shape), one Philox call per element."""
    x0, x1, x2, x3 = philox_block(element >> 2, index_lo, index_hi, key_lo, key_hi)
    lane = element & 3
    low_pair = lane < 2
    rho = tl.sqrt_rn(-2.0 * tl.log(uniform_from_bits(tl.where(low_pair, x0, x2))))
    phi = uniform_from_bits(tl.where(low_pair, x1, x3)) * TWO_PI_F32
    return tl.where((lane & 1) == 0, rho * tl.cos(phi), rho * tl.sin(phi))


@triton.jit
def float32_to_bfloat16(x):
    """float32 -> bfloat16 rounded to nearest even, written out in integer arithmetic.

    Why not ``x.to(tl.bfloat16)``: the GPU rounds to nearest even, but Triton's interpreter truncates
    (and its "rtne" mode rounds ties away and mishandles the carry), so the tests could not check it.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def select_lane(lane, v0, v1, v2, v3):
    """The (BLOCKS, 4) tile whose column ``lane`` (a (1, 4) arange) holds v0..v3 (each (BLOCKS,))."""
    return tl.where(
        lane == 0,
        v0[:, None],
        tl.where(lane == 1, v1[:, None], tl.where(lane == 2, v2[:, None], v3[:, None])),
    )


@triton.jit
def stream_tile(first_block, start, length, index_lo, index_hi, key_lo, key_hi, BLOCKS: tl.constexpr):
    """Gaussians of blocks [first_block, first_block + BLOCKS) as a (BLOCKS, 4) tile.

    Returns (z, column, inside): ``column`` the int64 position relative to ``start`` of each element,
    ``inside`` whether it lies in [0, length).
    """
    block = first_block + tl.arange(0, BLOCKS).to(tl.int64)
    lane = tl.arange(0, 4)[None, :]
    z0, z1, z2, z3 = gaussian_block(block, index_lo, index_hi, key_lo, key_hi)
    z = select_lane(lane, z0, z1, z2, z3)
    column = block[:, None] * 4 + lane - start
    inside = (column >= 0) & (column < length)
    return z, column, inside
