"""Cross-compile every Triton kernel of ``adamerge_fast.ops.triton_kernels`` for real GPUs, without a GPU.

``tests/test_triton.py`` runs the kernels through ``TRITON_INTERPRET=1``, which never lowers them to PTX/SASS:
an error that only shows when compiling for a GPU (layout conversion, ``tl.dot`` operand types, shared-memory
or register overflow, ptxas failures) slips through. This script compiles the kernels for ``sm_90`` and
``sm_80`` with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` and the ptxas bundled with Triton.

The variants are not hard-coded: the launchers of the kernel modules (``merge``, ``dcoef``, ``merge_many``,
``dcoef_many``, ``merged_linear_fwd/dx/dcoef_w``, ``entropy_fwd/bwd``, ``merged_lora_linear_fwd/bwd``,
``entropy_tile_``) are called on ``meta`` tensors over a grid of dtypes and representative problem sizes, with every
``@triton.jit`` kernel replaced by a recorder. Each recorded launch is specialized exactly as Triton's runtime would
specialize it (same binder: pointer alignment, ints equal to 1 become constexprs, divisibility by 16) and compiled
once per distinct specialization. So the block sizes, warps, stages, ``DOT_TY``/``PREC`` and flags are whatever the
launchers' config functions choose today.

One line per compiled variant: ``OK``/``FAIL``, the target, the kernel, its constexprs and options, the
pointer dtypes, the registers (``cuobjdump -res-usage`` on the cubin; the ptxas log if cuobjdump is missing),
the dynamic shared memory Triton launches it with (``metadata.shared``), the stack frame and the spill
stores/loads reported by ``ptxas -v`` (Triton always passes ``-v``; ``TRITON_DUMP_PTXAS_LOG`` makes it print
the log, captured here, and ``TRITON_ALWAYS_COMPILE`` makes sure ptxas runs even for a cached kernel).

A variant fails when it does not compile, when it spills more than ``--max-spill`` bytes, when its shared
memory exceeds what the target's SMs offer, or when registers x threads exceed the 64K-register file
(the last two would raise ``OutOfResources`` at launch). Spills already reported and listed in
:data:`KNOWN_SPILLS` print as ``KNOWN`` instead (``--strict``: they fail too). The exit status is 1 when any
variant fails (they are listed at the end), 2 when nothing was compiled, 3 on an error of the script itself.

Usage::

    PYTHONPATH=. python tools/triton_aot_check.py [--tmp DIR] [--cc 90 80] [--quick] [-j N] [--strict] [--list]

``--tmp`` (or ``$ADAMERGE_AOT_TMP``): directory for ``TRITON_CACHE_DIR`` (default: a fresh temporary directory,
removed at exit). Without ``--quick`` every distinct variant is compiled for every target (about 420 per target,
several minutes on 2 cores). ``--quick`` (what ``tests/test_triton_aot.py`` runs) compiles greedy covers
instead (:meth:`Variant.features`): for the first ``--cc`` every tile config / ``DOT_TY`` / ``PREC`` / warps /
stages combination, each with every flag value and with every pointer in 32 and in 16 bits where the launchers
do that; for the other targets each tile shape and each ``DOT_TY``/``PREC``; for all targets each exact pointer
dtype, flag combination and int specialization (``M=1``, unit strides) at least once per kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from itertools import product

# Must happen before anything imports triton (and adamerge_fast's kernel modules, which record it at import).
os.environ.pop("TRITON_INTERPRET", None)

# Spills found by this script and not fixed yet: (regex on the variant label, why). A matching variant whose only
# problem is spilling prints as KNOWN and does not fail; an entry that no longer excuses any variant fails the run
# (remove it once the kernel or its config is fixed). --strict ignores this list.
KNOWN_SPILLS: list[tuple[str, str]] = [  # (regex over the variant line, why it is tolerated)
]
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory per block (opt-in max)
REGS_PER_SM = 65536


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tmp", default=os.environ.get("ADAMERGE_AOT_TMP"), help="directory for the Triton cache")
    p.add_argument("--cc", type=int, nargs="+", default=[90, 80], help="compute capabilities (default: 90 80)")
    p.add_argument("--quick", action="store_true", help="greedy covers instead of every variant")
    p.add_argument("--max-spill", type=int, default=256, help="bytes of spill stores/loads allowed (default 256)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    p.add_argument("--list", action="store_true", help="only list the variants, compile nothing")
    p.add_argument("--strict", action="store_true", help="KNOWN_SPILLS entries fail too")
    return p.parse_args(argv)


ARGS = _parse_args(sys.argv[1:]) if __name__ == "__main__" else None
_TMP_OWNED = None
if ARGS is not None:
    if ARGS.tmp:
        os.makedirs(ARGS.tmp, exist_ok=True)
        _tmp = ARGS.tmp
    else:
        _tmp = _TMP_OWNED = tempfile.mkdtemp(prefix="adamerge_aot_")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(_tmp, "triton_cache")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # make_cubin prints `ptxas -v` output (captured per variant)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # so ptxas runs (and logs) even when the cache has the kernel

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")  # Triton 3.9's notice, not ours

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from adamerge_fast.ops.triton_kernels import entropy as EN  # noqa: E402
from adamerge_fast.ops.triton_kernels import linear_entropy as LE  # noqa: E402
from adamerge_fast.ops.triton_kernels import lora as LR  # noqa: E402
from adamerge_fast.ops.triton_kernels import merge as MG  # noqa: E402
from adamerge_fast.ops.triton_kernels import merged_linear as ML  # noqa: E402

MODULES = (MG, ML, EN, LR, LE)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(BIN, "cuobjdump")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
FLOATS = (F32, BF16, F16)
SHORT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "i64": "i64", "i32": "i32"}

# ------------------------------------------------------------------------------- representative problems
# a bias-sized tensor (1000: not a multiple of 16 elements, the unaligned multi-tensor group), a weight-sized one, and
# one whose dcoef has more than merge.CHUNK_ROWS partial-sum rows (the two-level segment sum)
MERGE_NUMEL = (1000, 3072 * 768, 4096 * 1100)
KS = (1, 3, 8)  # task vectors; K = 1 is specialized by Triton's runtime (an int equal to 1 becomes a constexpr)
# rows: single sample, small batch, the largest fused M (the launcher's own FUSED_MAX_M), long sequence (jit)
LINEAR_M = tuple(sorted({1, 16, 256, ML.FUSED_MAX_M, 4096}))
LINEAR_IN_OUT = ((768, 3072), (3072, 768), (4096, 4096))  # ViT-B MLP fc1 / fc2, a 7B-LLM projection
# (x dtype, weight dtype (w0, b0), task-vector dtype (tau_w, tau_b)): fp32 model, with fp32 or 16-bit task vectors
# (``task_vector_dtype``); autocast to bf16 / fp16 over fp32 parameters, same two task-vector storages; pure bf16 /
# fp16 model.
LINEAR_DTYPES = ((F32, F32, F32), (F32, F32, BF16), (F32, F32, F16), (BF16, F32, F32), (BF16, F32, BF16),
                 (F16, F32, F32), (F16, F32, F16), (BF16, BF16, BF16), (F16, F16, F16))  # fmt: skip
# LoRA: 8 tasks of rank 16 (R = 128), mixed ranks (R = 88), one rank-64 task; adapters in the model's dtype or fp32
LORA_RANKS = ((16,) * 8, (8, 16, 64), (64,))
LORA_DTYPES = ((F32, F32, F32), (BF16, F32, F32), (BF16, BF16, BF16), (F16, F16, F16), (BF16, BF16, F32))
ENTROPY_C = (10, 100, 1000, 32000, 128256)  # classes: CIFAR-10, CIFAR-100, ImageNet, LLM vocabularies
ENTROPY_N = 64


def _meta(shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


class _Unaligned:
    """A tensor argument whose address is a multiple of its element size but not of 16 bytes (``w0[1:]``): Triton's
    binder then drops the pointer's 16-byte divisibility, which changes the code (scalar instead of vector
    accesses). Meta tensors report address 0 (aligned), so every recorded launch also gets this twin."""

    def __init__(self, t):
        self.base, self.dtype = t, t.dtype

    def data_ptr(self):
        return self.base.element_size()

    def stride(self, *args):
        return self.base.stride(*args)

    def element_size(self):
        return self.base.element_size()


def _unaligned_twin(launch):
    fn, args, kwargs, name = launch
    wrap = [_Unaligned(a) if isinstance(a, torch.Tensor) else a for a in args]
    return fn, tuple(wrap), kwargs, name


class _Recorder:
    """Stands in for a JITFunction: ``rec[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, fn, sink, name):
        self.fn, self.sink, self.name = fn, sink, name  # name: the module attribute (two may share one function)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs, self.name))

        return launch


@contextlib.contextmanager
def _recording():
    launches, saved = [], []
    for mod in MODULES:
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                saved.append((mod, name, obj))
    try:
        for mod, name, obj in saved:
            setattr(mod, name, _Recorder(obj, launches, name))
        yield launches
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def kernels():
    """Every launchable @triton.jit kernel of the modules: by the modules' convention those named ``*_kernel`` (the
    other @triton.jit functions are helpers inlined into them, compiled as part of the kernels)."""
    return sorted({(mod.__name__, name) for mod in MODULES for name, obj in vars(mod).items()
                   if isinstance(obj, JITFunction) and name.endswith("_kernel")})  # fmt: skip


def drive_launchers():
    """Call every launcher on meta tensors over the representative problems; return the recorded launches."""
    old_prec = torch.get_float32_matmul_precision()
    with _recording() as launches:
        # merge / dcoef, one tensor and the one-launch lists, every (base or grad dtype, deltas dtype) pair
        for K, n in product(KS, MERGE_NUMEL):
            coef = _meta((K,))
            for b, d in product(FLOATS, FLOATS):
                base, deltas = _meta((n,), b), _meta((K, n), d)
                MG.merge(base, deltas, coef)
                MG.dcoef(base, deltas)
            MG.merge(_meta((n,), F32), _meta((K, n), F32), _meta((K,), BF16))  # 16-bit coefficients
            # task vectors read in place from a packed stack (attention's q/k/v thirds: slice stride 3n)
            MG.merge(_meta((n,), F32), _meta((K, 3 * n), BF16)[:, n : 2 * n], coef)
            MG.dcoef(_meta((n,), F32), _meta((K, 3 * n), BF16)[:, n : 2 * n])
            pairs = list(product(FLOATS, FLOATS))
            MG.merge_many([_meta((n,), b) for b, _ in pairs], [_meta((K, n), d) for _, d in pairs], _meta((9, K)))
            MG.dcoef_many([_meta((n,), b) for b, _ in pairs], [_meta((K, n), d) for _, d in pairs])
        # merged linear: forward (no bias, plain bias, merged bias), dx, dcoef_w; fp32 dots as "ieee" and "tf32"
        # (torch's "highest" / "high" float32 matmul precision, which the launchers follow)
        try:
            for prec in ("highest", "high"):
                torch.set_float32_matmul_precision(prec)
                for (xd, wd, td), M, (IN, OUT), K in product(LINEAR_DTYPES, LINEAR_M, LINEAR_IN_OUT, KS):
                    x, dy = _meta((M, IN), xd), _meta((M, OUT), xd)
                    w0, tau, coef = _meta((OUT, IN), wd), _meta((K, OUT, IN), td), _meta((K,))
                    b0, tau_b, coef_b = _meta((OUT,), wd), _meta((K, OUT), td), _meta((K,))
                    ML.merged_linear_fwd(x, w0, tau, coef)
                    ML.merged_linear_fwd(x, w0, tau, coef, b0)
                    ML.merged_linear_fwd(x, w0, tau, coef, b0, tau_b, coef_b)
                    ML.merged_linear_dx(dy, w0, tau, coef, out_dtype=xd)
                    ML.merged_linear_dcoef_w(dy, x, tau)
                # LoRA adapters as task vectors: forward (no bias, merged bias), backward (dx + both coefficient
                # gradients, and the coefficient gradient alone), for both strategies (chosen by M here)
                for (xd, wd, ad), M, (IN, OUT), ranks in product(LORA_DTYPES, LINEAR_M, LINEAR_IN_OUT, LORA_RANKS):
                    K, R = len(ranks), sum(ranks)
                    x, dy, u = _meta((M, IN), xd), _meta((M, OUT), xd), _meta((M, R))
                    w0, a, b, coef, scale = _meta((OUT, IN), wd), _meta((R, IN), ad), _meta((OUT, R), ad), \
                        _meta((K,)), _meta((K,))  # fmt: skip
                    b0, tau_b = _meta((OUT,), wd), _meta((K, OUT), ad)
                    LR.merged_lora_linear_fwd(x, w0, a, b, ranks, coef, scale)
                    LR.merged_lora_linear_fwd(x, w0, a, b, ranks, coef, scale, b0, tau_b, coef)
                    LR.merged_lora_linear_bwd(dy, x, w0, a, b, ranks, coef, scale, u, tau_b, True, True, True)
                    LR.merged_lora_linear_bwd(dy, x, w0, a, b, ranks, coef, scale, u, None, False, True, False)
            # split-K forward / dx (fp32 partial products + _split_sum_kernel) and the split-M dcoef_w, which the
            # launchers pick on a GPU from its multiprocessor count: forced here (meta tensors have no GPU)
            ML.SPLIT_R, ML.SPLIT_M = 4, 4
            for (xd, wd, td), M, K in product(LINEAR_DTYPES, (1, 16), KS):
                IN, OUT = LINEAR_IN_OUT[0]
                x, dy = _meta((M, IN), xd), _meta((M, OUT), xd)
                w0, tau, coef = _meta((OUT, IN), wd), _meta((K, OUT, IN), td), _meta((K,))
                b0, tau_b, coef_b = _meta((OUT,), wd), _meta((K, OUT), td), _meta((K,))
                ML.merged_linear_fwd(x, w0, tau, coef, strategy="fused")
                ML.merged_linear_fwd(x, w0, tau, coef, b0, strategy="fused")
                ML.merged_linear_fwd(x, w0, tau, coef, b0, tau_b, coef_b, strategy="fused")
                ML.merged_linear_dx(dy, w0, tau, coef, out_dtype=xd, strategy="fused")
                ML.merged_linear_dcoef_w(_meta((4096, OUT), xd), _meta((4096, IN), xd), tau)
        finally:
            torch.set_float32_matmul_precision(old_prec)
            ML.SPLIT_R = ML.SPLIT_M = None
        # entropy of logits [N, C] and its gradient (the upstream gradient of the fp32 entropy is fp32)
        for zd, C in product(FLOATS, ENTROPY_C):
            z = _meta((ENTROPY_N, C), zd)
            EN.entropy_fwd(z)
            EN.entropy_bwd(_meta((ENTROPY_N,)), z)
        # linear_entropy's tile step on an fp32 logits tile: entropy only, gradient for g = 1 (reduced), for g[c]
        for C in ENTROPY_C:
            tile = _meta((ENTROPY_N, C))
            LE.entropy_tile_(tile, None, False)
            LE.entropy_tile_(tile, None, True)
            LE.entropy_tile_(tile, _meta((ENTROPY_N,)), True)
        # transposed logits (a strided class dimension)
        z = _meta((1000, ENTROPY_N), BF16).t()
        EN.entropy_fwd(z)
        EN.entropy_bwd(_meta((ENTROPY_N,)), z)
    return launches + [_unaligned_twin(launch) for launch in launches]


# --------------------------------------------------------------------------------------------- variants
def _fmt(v):
    if isinstance(v, tl.dtype):
        return SHORT.get(str(v).replace("float", "fp").replace("bfloat", "bf"), str(v))
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


class Variant:
    """One kernel specialization for one target, packed exactly as ``JITFunction.run`` would pack it."""

    def __init__(self, fn, name, cc, signature, constexprs, attrs, options):
        self.fn, self.name, self.cc = fn, name, cc
        self.signature, self.constexprs, self.attrs, self.options = signature, constexprs, attrs, options
        names = fn.arg_names
        declared = {p.name for p in fn.params if p.is_constexpr}
        cx = {names[k[0]]: v for k, v in constexprs.items()}
        # cfg: tile sizes, DOT_TY/PREC and launch options; flags: HAS_*/MERGE_*; dtypes: pointer element types and
        # the *_TY constexprs of the pointer-table kernels; spec: ints the runtime specialized to 1 (M=1, strides)
        self.flags = " ".join(f"{k}={_fmt(v)}" for k, v in cx.items() if k.startswith(("HAS_", "MERGE_")))
        self.dtypes = [(k, t[1:]) for k, t in signature.items() if t.startswith("*")]
        self.dtypes += [(k, _fmt(v)) for k, v in cx.items() if k.endswith("_TY") and k != "DOT_TY"]
        self.dot = " ".join(f"{k}={_fmt(v)}" for k, v in cx.items() if k in ("DOT_TY", "PREC"))
        self.tiles = " ".join(f"{k}={_fmt(v)}" for k, v in cx.items() if k in declared and k not in ("DOT_TY", "PREC")
                              and not k.startswith(("HAS_", "MERGE_")) and not k.endswith("_TY"))  # fmt: skip
        self.opts = f"w{options.num_warps} s{options.num_stages}"
        self.cfg = " ".join(p for p in (self.dot, self.tiles, self.opts) if p)
        self.spec = " ".join(f"{k}={_fmt(v)}" for k, v in cx.items() if k not in declared)
        ints = [k for k, t in signature.items() if t[0] == "i" or (t == "constexpr" and k not in declared)]
        self.ints = [(k, k in cx) for k in ints]  # (int parameter, specialized to 1?)
        # a pointer argument without Triton's 16-byte divisibility attribute (see _Unaligned)
        divisible = {names[k[0]] for k, v in attrs.items() if any(a[0] == "tt.divisibility" for a in v)}
        self.unaligned = any(t.startswith("*") and k not in divisible for k, t in signature.items())
        self.divisible, self.cxv = divisible, {k: _fmt(v) for k, v in cx.items()}  # for PTX_RULES
        self.key = (name, cc, repr(sorted(signature.items())),
                    repr(sorted((k, _fmt(v)) for k, v in constexprs.items())), repr(sorted(attrs.items())),
                    repr(sorted(options.__dict__.items())))  # fmt: skip

    def features(self, fine: bool):
        """What --quick covers. Always: each exact pointer dtype, flag combination and int specialization (M=1,
        unit strides) once per kernel. ``fine`` (first target) adds every config (tiles, DOT_TY/PREC, warps,
        stages) with each flag value and each pointer's dtype width (32/16-bit: register pressure); else (other
        targets) each tile shape (with its warps/stages) and each DOT_TY/PREC once per kernel."""
        n = self.name
        base = {(n, "dtype", a, t) for a, t in self.dtypes} | {(n, "flags", self.flags)}
        base |= {(n, "int", a, one) for a, one in self.ints} | {(n, "unaligned", self.unaligned)}
        base |= {(n, "ptx rule", PTX_RULES.index(r)) for r in _ptx_rules(self)}
        if fine:
            return (base | {(n, "cfg", self.cfg)} | {(n, "flag", self.cfg, f) for f in self.flags.split()}
                    | {(n, "width", self.cfg, a, re.sub(r"\D", "", t)) for a, t in self.dtypes})  # fmt: skip
        return base | {(n, "tiles", self.tiles, self.opts), (n, "dot", self.dot)}

    def label(self):
        types = ",".join(SHORT.get(t, t) for _, t in self.dtypes)
        parts = [f"sm_{self.cc}", self.name, self.flags, self.cfg, f"[{types}]"]
        if self.spec:
            parts.append(f"({self.spec})")
        if self.unaligned:
            parts.append("unaligned")
        return " ".join(p for p in parts if p)


def pack(launches, cc):
    """Specialize the recorded launches for target ``cc`` with Triton's own binder; distinct variants, in order."""
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binders, out = {}, {}
    for fn, args, kwargs, name in launches:
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        v = Variant(fn, name, cc, signature, constexprs, attrs, options)
        out.setdefault(v.key, v)
    return list(out.values())


def cover(variants, fine):
    """A small subset with all the features (:meth:`Variant.features`) of ``variants`` (greedy set cover)."""
    feats = [v.features(fine) for v in variants]
    need = set().union(*feats) if feats else set()
    chosen = []
    while need:
        i = max(range(len(variants)), key=lambda j: len(feats[j] & need))
        chosen.append(variants[i])
        need -= feats[i]
    return sorted(chosen, key=variants.index)


# ---------------------------------------------------------------------------------------------- compile
# PTX checks (issue 12 item 6): variants whose label matches must reach these global-memory access widths (bytes,
# the widest ld.global / st.global vector in the PTX). The multi-tensor kernels read their pointers from a table;
# the ALIGNED variant's hints (tl.multiple_of) must give them the 16-byte accesses of the single-tensor kernels.
PTX_RULES: list[tuple[str, dict, tuple, int, int, str]] = [
    # (kernel, constexpr values, arguments Triton must see 16-divisible, min load bytes, min store bytes, why)
    ("_merge_kernel", {}, ("base_ptr", "delta_ptr", "out_ptr", "N", "stride_k"), 16, 16,
     "single-tensor merge of aligned tensors: 16-byte vector loads/stores"),
    ("_dcoef_partial_kernel", {}, ("grad_ptr", "delta_ptr", "N", "stride_k"), 16, 0,
     "single-tensor dcoef of aligned tensors: 16-byte vector loads"),
    ("_merge_many_kernel", {"ALIGNED": "1"}, (), 16, 16,
     "the ALIGNED multi-tensor merge (pointers read from the table) vectorizes like the single-tensor one"),
    ("_dcoef_many_partial_kernel", {"ALIGNED": "1"}, (), 16, 0,
     "the ALIGNED multi-tensor dcoef (pointers read from the table): 16-byte vector loads"),
    ("_merge_one_kernel", {"ALIGNED": "1"}, (), 16, 16, "the capture-path merge of an aligned tensor vectorizes"),
    ("_dcoef_one_kernel", {"ALIGNED": "1"}, (), 16, 0, "the capture-path dcoef of an aligned tensor vectorizes"),
    ("_entropy_fwd_kernel", {"stride_c": "1"}, ("z_ptr", "C", "stride_n"), 16, 0,
     "entropy of contiguous rows (64-bit column offsets): 16-byte vector loads"),
    ("_entropy_bwd_kernel", {"stride_c": "1"}, ("z_ptr", "dz_ptr", "C", "stride_n"), 16, 16,
     "entropy gradient of contiguous rows (64-bit column offsets): 16-byte vector loads and stores"),
]  # fmt: skip


def _ptx_rules(v):
    """The PTX_RULES that apply to variant ``v``."""
    return [r for r in PTX_RULES if v.name == r[0] and all(v.cxv.get(k) == val for k, val in r[1].items())
            and all(a in v.divisible or v.cxv.get(a) == "1" for a in r[2])]  # fmt: skip


_PTX_LD = re.compile(r"\bld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)")
_PTX_ST = re.compile(r"\bst\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)")


def _widest(rx, ptx: str) -> int:
    """The widest access (bytes) of the instructions ``rx`` matches in ``ptx`` (0: none)."""
    return max((int(v or 1) * int(bits) // 8 for v, bits in rx.findall(ptx)), default=0)


_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RES_REGS = re.compile(r"REG:(\d+)")

VARIANTS: list[Variant] = []  # set before the worker pool forks


def compile_one(i):
    """Compile ``VARIANTS[i]``; returns a dict of the results (picklable), ``error`` set when it failed."""
    v = VARIANTS[i]
    r = {"i": i, "error": None, "regs": None, "smem": None, "stack": None, "spill_st": None, "spill_ld": None,
         "regs_from": None, "secs": 0.0, "ld_bytes": None, "st_bytes": None}  # fmt: skip
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(v.fn, v.signature, v.constexprs, v.attrs)
            k = triton.compile(src, target=GPUTarget("cuda", v.cc, 32), options=v.options.__dict__)
    except Exception as e:  # noqa: BLE001 (any compile error is a finding)
        msg = f"{type(e).__name__}: {e}"
        r["error"] = msg if len(msg) < 4000 else msg[:4000] + " ..."
        r["secs"] = time.perf_counter() - t0
        return r
    r["secs"] = time.perf_counter() - t0
    text = log.getvalue()
    m = _PTXAS_SPILL.search(text)
    if m:  # else: no ptxas log (TRITON_DUMP_PTXAS_LOG unsupported by this Triton): spills not checked
        r["stack"], r["spill_st"], r["spill_ld"] = (int(g) for g in m.groups())
    r["smem"] = int(getattr(k.metadata, "shared", 0) or 0)
    ptx = k.asm.get("ptx") if hasattr(k, "asm") else None
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    if ptx:
        r["ld_bytes"], r["st_bytes"] = _widest(_PTX_LD, ptx), _widest(_PTX_ST, ptx)
    cubin = k.asm.get("cubin") if hasattr(k, "asm") else None
    if cubin and os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = _RES_REGS.search(res)
        if m:
            r["regs"], r["regs_from"] = int(m.group(1)), "cuobjdump"
    if r["regs"] is None:
        m = _PTXAS_REGS.search(text)
        if m:
            r["regs"], r["regs_from"] = int(m.group(1)), "ptxas"
        elif getattr(k.metadata, "n_regs", None):
            r["regs"], r["regs_from"] = int(k.metadata.n_regs), "metadata"
    return r


def check(v, r, max_spill):
    """Problems of one compiled variant, as (kind, message) pairs; empty: fine."""
    if r["error"]:
        return [("compile", r["error"])]
    probs = []
    for what, name in (("spill_st", "spill stores"), ("spill_ld", "spill loads")):
        if r[what] is not None and r[what] > max_spill:
            probs.append(("spill", f"{r[what]} bytes of {name} (> {max_spill})"))
    limit = MAX_SHARED.get(v.cc)
    if limit and r["smem"] is not None and r["smem"] > limit:
        probs.append(("smem", f"{r['smem']} bytes of shared memory > {limit} available on sm_{v.cc}"))
    threads = 32 * v.options.num_warps
    if r["regs"] is not None and r["regs"] * threads > REGS_PER_SM:
        probs.append(("regs", f"{r['regs']} registers x {threads} threads > {REGS_PER_SM}"))
    for _, _, _, ld, st, why in _ptx_rules(v):
        if r["ld_bytes"] is None:
            probs.append(("ptx", f"no PTX to check ({why})"))
        elif r["ld_bytes"] < ld or r["st_bytes"] < st:
            probs.append(("ptx", f"widest global load {r['ld_bytes']} B / store {r['st_bytes']} B, expected "
                                 f">= {ld} / {st} B: {why}"))  # fmt: skip
    return probs


def _known(v, probs):
    """The KNOWN_SPILLS entries excusing ``probs`` (all of them spills), else []."""
    if not probs or any(kind != "spill" for kind, _ in probs):
        return []
    return [i for i, (rx, _) in enumerate(KNOWN_SPILLS) if re.search(rx, v.label())]


def _line(status, v, r):
    def num(x):
        return "?" if x is None else str(x)

    if r["error"]:
        return f"{status} {v.label()} | compile error ({r['secs']:.1f}s)"
    return (f"{status} {v.label()} | regs={num(r['regs'])} smem={num(r['smem'])} stack={num(r['stack'])} "
            f"spill_st={num(r['spill_st'])} spill_ld={num(r['spill_ld'])} ld={num(r['ld_bytes'])}B "
            f"st={num(r['st_bytes'])}B ({r['secs']:.1f}s)")  # fmt: skip


def _run_all(jobs):
    idx = range(len(VARIANTS))
    if jobs > 1 and len(VARIANTS) > 1 and "fork" in __import__("multiprocessing").get_all_start_methods():
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            yield from pool.map(compile_one, idx)
    else:
        yield from map(compile_one, idx)


def main(args) -> int:
    t0 = time.perf_counter()
    launches = drive_launchers()
    seen = {name for _, name in kernels()}
    recorded = {name for _, _, _, name in launches}
    failures = [f"kernel {name}: never launched by the launchers driven here (add it to drive_launchers)"
                for name in sorted(seen - recorded)]  # fmt: skip
    per_cc = {cc: pack(launches, cc) for cc in args.cc}
    if args.quick:
        per_cc = {cc: cover(vs, fine=i == 0) for i, (cc, vs) in enumerate(per_cc.items())}
    VARIANTS[:] = [v for cc in args.cc for v in per_cc[cc]]
    print(f"# {len(launches)} launches recorded, {len(VARIANTS)} variants to compile "
          f"({', '.join(f'sm_{cc}: {len(per_cc[cc])}' for cc in args.cc)}), triton {triton.__version__}, "
          f"{args.jobs} jobs, spill limit {args.max_spill} B", flush=True)  # fmt: skip
    if args.list:
        for v in VARIANTS:
            print(v.label())
        return 0

    summary: dict[tuple, dict] = {}
    no_spill_info = 0
    known_hits = {i: [] for i in range(len(KNOWN_SPILLS))}  # entry -> labels of the variants it excused
    known_seen = {i: 0 for i in range(len(KNOWN_SPILLS))}  # entry -> compiled variants its pattern matches
    ptx_checked = {i: 0 for i in range(len(PTX_RULES))}  # rule -> compiled variants it checked
    for r in _run_all(max(1, args.jobs)):
        v = VARIANTS[r["i"]]
        probs = check(v, r, args.max_spill)
        for rule in _ptx_rules(v):
            ptx_checked[PTX_RULES.index(rule)] += r["error"] is None
        for i, (rx, _) in enumerate(KNOWN_SPILLS):
            known_seen[i] += r["error"] is None and re.search(rx, v.label()) is not None
        known = [] if args.strict else _known(v, probs)
        for i in known:
            known_hits[i].append(v.label())
        status = "KNOWN" if known else ("FAIL" if probs else "OK")
        print(_line(status, v, r), flush=True)
        if probs and not known:
            failures += [f"{v.label()}: {msg}" for _, msg in probs]
        if r["error"] is None:
            no_spill_info += r["spill_st"] is None
            s = summary.setdefault((v.name, v.cc), {"n": 0, "regs": 0, "smem": 0, "spill": 0, "worst": ""})
            s["n"] += 1
            if (r["regs"] or 0) >= s["regs"]:
                s["regs"], s["worst"] = r["regs"] or 0, v.label()
            s["smem"] = max(s["smem"], r["smem"] or 0)
            s["spill"] = max(s["spill"], r["spill_st"] or 0, r["spill_ld"] or 0)
    if not args.strict:
        for i, (rx, _) in enumerate(KNOWN_SPILLS):
            if not known_hits[i]:  # fixed (or its configs changed): the entry must go, so that a regression fails
                failures.append(f"KNOWN_SPILLS entry {rx!r} no longer excuses anything ({known_seen[i]} compiled "
                                f"variants match it, none spills > {args.max_spill} B): remove it")  # fmt: skip
    for i, n in ptx_checked.items():
        if not n:
            failures.append(f"PTX rule {PTX_RULES[i][:3]} matched no compiled variant (no launcher picks it any more?)")
    print("# PTX checks (widest global access >= 16 B): "
          + ", ".join(f"{PTX_RULES[i][0]} {PTX_RULES[i][1]}: {n} variants checked" for i, n in ptx_checked.items()))
    ok = sum(s["n"] for s in summary.values())
    print("\n# summary: kernel, target, variants compiled, max registers, max dynamic smem (B), max spill (B)")
    for (name, cc), s in sorted(summary.items()):
        print(f"#   {name:28s} sm_{cc}  n={s['n']:3d}  max_regs={s['regs']:3d}  max_smem={s['smem']:6d}  "
              f"max_spill={s['spill']:4d}   max regs: {s['worst']}")  # fmt: skip
    if no_spill_info:
        print(f"# note: no ptxas log for {no_spill_info} variants: their spills were not checked")
    for i, (rx, why) in enumerate(KNOWN_SPILLS):
        if known_hits[i]:
            print(f"# KNOWN (not failing; --strict to fail): {len(known_hits[i])} variants match {rx!r}: {why}")
    print(f"# compiled {ok} variants in {time.perf_counter() - t0:.1f}s, {len(failures)} failures")
    if failures:
        print("\nFAILURES:")
        for f in failures:
            print("  " + f)
        return 1
    return 0 if ok else 2


if __name__ == "__main__":
    try:
        rc = main(ARGS)
    except Exception:
        traceback.print_exc()
        rc = 3
    finally:
        if _TMP_OWNED:
            shutil.rmtree(_TMP_OWNED, ignore_errors=True)
    sys.exit(rc)
