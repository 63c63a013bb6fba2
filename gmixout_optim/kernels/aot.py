"""Compile every Triton kernel ahead of time for a GPU architecture, without a GPU.

The interpreter runs the kernels' arithmetic but not the compiler: a kernel that only fails
to compile, or that spills registers at its block size, shows up only here. Each entry of
:func:`specs` is one kernel with the argument types and constexprs it is launched with (the
block and warps come from ``_common.LAUNCH``, so what is compiled is what runs), for each
dtype it is used with. ptxas's own report gives the registers and spills per thread.

    python -m gmixout_optim.kernels.aot --arch 90 80 [--out benchmarks/results]

Needs Triton's NVIDIA backend with its bundled ptxas, and ``TRITON_INTERPRET`` unset (the
interpreter replaces the compiler); a GPU is not needed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
from typing import NamedTuple

# Per-SM limits shared by sm_80 and sm_90 (CUDA occupancy calculator): 64K 32-bit registers,
# 64 resident warps, 32 resident blocks; registers are allocated per warp in units of 256.
_REGS_PER_SM = 65536
_WARPS_PER_SM = 64
_BLOCKS_PER_SM = 32


class Spec(NamedTuple):
    """One compilation: ``kernel`` (a module attribute name) with its argument types."""
    module: str
    kernel: str
    variant: str          # what distinguishes this compilation (dtypes, flags)
    types: dict           # argument name -> Triton type string ("*bf16", "i64", "fp32")
    constexprs: dict      # argument name -> value (BLOCK included)
    num_warps: int
    hot: bool             # on the step's or redraw's path (must not spill)


def occupancy(regs: int, num_warps: int) -> float:
    """Fraction of an SM's warp slots held by resident blocks of this kernel."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    blocks = min(_WARPS_PER_SM // num_warps, _REGS_PER_SM // (regs_per_warp * num_warps), _BLOCKS_PER_SM)
    return blocks * num_warps / _WARPS_PER_SM


def specs() -> list[Spec]:
    """Every kernel of the package, once per dtype it is launched with (see the module docstring)."""
    import triton.language as tl

    from ._common import LAUNCH

    out = []

    def add(module, kernel, variant, types, constexprs, op, hot=True):
        block, warps = LAUNCH[op]
        out.append(Spec(module, kernel, variant, types, dict(constexprs, BLOCK=block), warps, hot))

    f32 = tl.float32
    for wd in ("fp32", "bf16", "fp16"):
        for idx in ("i32", "i64") if wd == "bf16" else ("i32",):
            v = f"w={wd} S={idx}"
            anchored = wd != "fp32"  # 16-bit weights keep a stored anchor (weight dtype), fp32 derive it
            for check in (False, True):
                add("gather", "_gather_kernel", f"{v} check={check}",
                    dict(grad=f"*{wd}", support=f"*{idx}", out="*fp32", n="i64", capacity="i64", keep="fp32",
                         found_inf="*fp32"), {"CHECK": check}, "gather")
            add("write", "_anchor_kernel", v, dict(param=f"*{wd}", support=f"*{idx}", residual="*fp32",
                                                   out="*fp32", n="i64", keep="fp32"), {"CDT": f32}, "anchor")
            add("write", "_write_kernel", v, dict(param=f"*{wd}", support=f"*{idx}", anchor=f"*{wd}",
                                                  residual="*fp32", n="i64", keep="fp32"), {"CDT": f32}, "write")
            add("merge", "_merge_kernel", v, dict(param=f"*{wd}", support=f"*{idx}", residual="*fp32",
                                                  anchor=f"*{wd}", n="i64", keep="fp32", coeff="fp32"),
                {"HAS_ANCHOR": anchored, "CDT": f32}, "merge")
            scal = dict.fromkeys(["keep", "wd", "wd_factor", "lerp_w", "beta2", "one_minus_beta2", "bc2_sqrt",
                                  "eps", "neg_step"], "fp32")
            # gathering grad_S itself, or reading the checked compact gradient and honouring found_inf
            for decoupled, compact in ((True, False), (False, False), (True, True)):
                add("adamw", "_adamw_kernel", f"{v} decoupled={decoupled} compact={compact}",
                    dict(scal, param=f"*{wd}", grad="*fp32" if compact else f"*{wd}", support=f"*{idx}",
                         residual="*fp32", exp_avg="*fp32", exp_avg_sq="*fp32", anchor=f"*{wd}", n="i64",
                         found_inf="*fp32"),
                    {"HAS_ANCHOR": anchored, "DECOUPLED": decoupled, "HAS_WD": True, "LERP_SMALL": True,
                     "COMPACT": compact, "HONOUR_INF": compact, "CDT": f32}, "adamw")
    # grouped kernels: pointer tables (int64) and per-tensor tables; dtypes are constexprs
    grp = dict(blk_tensor="*i32", blk_start="*i64")
    tdt = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    for wd in ("fp32", "bf16", "fp16"):
        anchored = wd != "fp32"
        dts = dict(WDT=tdt[wd], SDT=tl.int32, CDT=f32)
        for check in (False, True):
            add("gather", "_gather_grouped_kernel", f"w={wd} check={check}",
                dict(grp, grads="*i64", supports="*i64", outs="*i64", ns="*i64", caps="*i64", keeps="*fp32",
                     found_inf="*fp32"), {"GDT": tdt[wd], "SDT": tl.int32, "CHECK": check}, "gather")
        add("write", "_anchor_grouped_kernel", f"w={wd}",
            dict(grp, params="*i64", supports="*i64", residuals="*i64", outs="*i64", ns="*i64", keeps="*fp32"),
            dts, "anchor")
        add("write", "_write_grouped_kernel", f"w={wd}",
            dict(grp, params="*i64", supports="*i64", anchors="*i64", residuals="*i64", ns="*i64", keeps="*fp32"),
            dict(dts, ADT=tdt[wd]), "write")
        add("write", "_read_anchor_grouped_kernel", f"w={wd}",
            dict(grp, params="*i64", supports="*i64", anchors="*i64", ns="*i64", caps="*i64"),
            {"WDT": tdt[wd], "SDT": tl.int32}, "write")
        add("merge", "_merge_grouped_kernel", f"w={wd}",
            dict(grp, params="*i64", supports="*i64", residuals="*i64", anchors="*i64", ns="*i64", keeps="*fp32",
                 coeffs="*fp32"), dict(dts, HAS_ANCHOR=anchored), "merge")
        for decoupled, compact in ((True, False), (False, False), (True, True)):
            add("adamw", "_adamw_grouped_kernel", f"w={wd} decoupled={decoupled} compact={compact}",
                dict(grp, params="*i64", grads="*i64", supports="*i64", residuals="*i64", exp_avgs="*i64",
                     exp_avg_sqs="*i64", anchors="*i64", ns="*i64", keeps="*fp32", steps="*fp32", lrs="*fp64",
                     hp64="*fp64", found_inf="*fp32", wd="fp32", lerp_w="fp32", beta2="fp32",
                     one_minus_beta2="fp32", eps="fp32"),
                dict(dts, HAS_ANCHOR=anchored, DECOUPLED=decoupled, HAS_WD=True, LERP_SMALL=True, COMPACT=compact,
                     HONOUR_INF=compact, LR_PER_TENSOR=False, GDT=tdt[wd]), "adamw_grouped")
    tab = dict(q0s="*i64", g_los="*i64", g_his="*i64", segs="*i64", tensors="*i64", seeds="*i64", keeps="*fp32")
    add("support", "_count_kernel", "", dict(tab, counts="*i64"), {}, "support")
    for idx in ("i32", "i64"):
        add("support", "_write_kernel", f"S={idx}",
            dict(tab, l_bases="*i64", scan="*i64", t_firsts="*i64", t_ends="*i64", out_offs="*i64", caps="*i64",
                 support=f"*{idx}", sizes="*i64"), {}, "support")
        add("remap", "_remap_kernel", f"S={idx} K=2",
            dict(blk_tensor="*i32", blk_start="*i64", caps="*i64", offs="*i64", old_ns="*i64", new_ns="*i64",
                 old_flat=f"*{idx}", new_flat=f"*{idx}", src="*i64", dst="*i64", T="i32"), {"K": 2}, "remap")
    # test-only kernels (the PyTorch Philox is checked against them): compiled, not hot
    add("philox", "_philox_uniform_kernel", "", dict(offsets_ptr="*i64", out_ptr="*fp32", seed="i64", numel="i64"),
        {}, "philox", hot=False)
    add("philox", "_randint4x_kernel", "", dict(counters_ptr="*i64", out_ptr="*i64", seed="i64", numel="i64"),
        {}, "philox", hot=False)
    return out


def compile_one(spec: Spec, arch: int) -> dict:
    """Compile ``spec`` for ``sm_<arch>``; returns its registers, spills and occupancy."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{spec.kernel} is not a compiled JITFunction (is TRITON_INTERPRET set?)")
    signature = {name: "constexpr" if name in spec.constexprs else spec.types[name] for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs)
    # ptxas's report (-v) is the only place the spills are written; it is printed when this
    # knob is set, and ptxas runs only on a cache miss, hence always_compile.
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.findall(r"(\d+) bytes stack frame", text)
    if not regs or not spills:
        raise RuntimeError(f"no ptxas report for {spec.kernel}:\n{text}")
    regs = int(regs[-1])
    return {"module": spec.module, "kernel": spec.kernel, "variant": spec.variant, "arch": f"sm_{arch}",
            "BLOCK": spec.constexprs["BLOCK"], "num_warps": spec.num_warps, "hot": spec.hot,
            "registers": regs, "spill_store_bytes": int(spills[-1][0]), "spill_load_bytes": int(spills[-1][1]),
            "stack_bytes": int(stack[-1]) if stack else 0,
            "occupancy": occupancy(regs, spec.num_warps)}


def compile_all(archs=(90, 80)) -> list[dict]:
    return [compile_one(s, a) for a in archs for s in specs()]


def summary(rows: list[dict]) -> list[dict]:
    """The worst figures per (kernel, arch) over its variants: the table in docs/kernels.md."""
    out = {}
    for r in rows:
        key = (r["module"], r["kernel"], r["arch"])
        o = out.setdefault(key, dict(r, variant="all"))
        for k in ("registers", "spill_store_bytes", "spill_load_bytes", "stack_bytes"):
            o[k] = max(o[k], r[k])
        o["occupancy"] = min(o["occupancy"], r["occupancy"])
    return list(out.values())


def kernels_in_package() -> set[tuple[str, str]]:
    """Every launchable kernel of the package: ``@triton.jit`` functions named ``*_kernel``
    (device helpers such as ``cast_to`` are compiled inside the kernels that call them)."""
    import importlib
    import pkgutil

    import triton

    pkg = importlib.import_module(__package__)
    found = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{__package__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel") \
                    and obj.fn.__module__ == mod.__name__:
                found.add((info.name, name))
    return found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--out", default=None, help="folder: writes kernels_compile_sm<arch>.json there")
    args = ap.parse_args(argv)
    import triton

    rows = compile_all(args.arch)
    print(f"{'kernel':<40}{'arch':<7}{'BLOCK':>6}{'warps':>6}{'regs':>6}{'spill B':>9}{'occup.':>8}")
    for r in summary(rows):
        print(f"{r['module'] + '.' + r['kernel']:<40}{r['arch']:<7}{r['BLOCK']:>6}{r['num_warps']:>6}"
              f"{r['registers']:>6}{r['spill_store_bytes']:>9}{r['occupancy']:>8.2f}")
    if args.out:
        for arch in args.arch:
            path = f"{args.out}/kernels_compile_sm{arch}.json"
            with open(path, "w") as f:
                json.dump({"triton": triton.__version__, "arch": f"sm_{arch}",
                           "compilations": [r for r in rows if r["arch"] == f"sm_{arch}"]}, f, indent=1)
                f.write("\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
