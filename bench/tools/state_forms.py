"""Which form of the chunked scan's state pass is faster where: ``python -m bench.tools.state_forms [--shapes ...]``.

The state pass has two forms (``gateloop_kernels.chunked.states._carried``): one kernel walking the chunks in
order with the state in registers (``_chunk_states``, one program per batch*head and state tile: few programs
when B*H is small), or two passes (``_chunk_local`` in parallel over every chunk, then the memory-bound
``_state_scan``). This times one forward+backward of the whole scan (``do_bench`` medians, device-bound sizes)
in each form, on one sequence and on the same tokens packed as documents (``cu_seqlens``, log-uniform lengths
as ``python -m bench scan --varlen`` draws them), per dtype, and checks each form's outputs and gradients
against the other's. The form is forced through the launch table (``chunked.config._CFG[dtype]["chunk_states"]``
and ``["chunk_states_exact"]``: None is the two passes) and ``states._sm_count`` (1: the grid rule
``states._one_pass_pays`` always takes the one kernel); the default choice is timed beside them.
Prints a table and, on a GPU, appends its rows to ``bench/results/state_forms.jsonl`` (docs/kernels.md section 1
cites them).
"""
from __future__ import annotations

import argparse

import torch

from bench import harness, results
from bench.harness import rel_err
from bench.varlen import draw_lengths

def _case(H: int, T: int, d: int, dtype: torch.dtype, packed: bool, seed: int = 0):
    from gateloop_kernels.chunked.op import _chunk_gate_loop
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(1, T, H, d, device="cuda", generator=g).to(dtype) for _ in range(4))
    k = k / d ** 0.5
    r = torch.rand(1, T, H, device="cuda", generator=g) * 0.1 + 0.9
    ph = torch.rand(1, T, H, device="cuda", generator=g) - 0.5
    ar, ai = r * torch.cos(ph), r * torch.sin(ph)
    lengths = draw_lengths(T, 64, 8192, seed) if packed else [T]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    leaves = [t.requires_grad_() for t in (q, k, v, ar, ai)]

    def run():
        return _chunk_gate_loop(*leaves, None, False, "ieee", 64, cu if packed else None)[0]
    return run, leaves, do, len(lengths)


OP = "chunked scan fwd+bwd, state pass form"


def result_rows(H: int, T: int, N: int, d: int, dtype: str, times: dict, env: dict, note=None) -> list[dict]:
    """One row per form (``one``, ``two``, ``default``: the rule's choice) of a case, fwd+bwd ms; ``N`` the number
    of packed documents (1: one sequence, no ``cu_seqlens``)."""
    shape = {"B": 1, "T": T, "N": N, "H": H, "d": d, "e": d}
    return [results.row("state_forms", OP, form, shape, dtype, "fwdbwd_ms", "ms", times[form], env,
                        precision="ieee", note=note) for form in ("one", "two", "default")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tools.state_forms", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8:32768:64,8:4096:64,16:16384:64,32:8192:64",
                    help="H:T:d,... (one row of T tokens, H heads)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="float32 runs its exact mode (3xTF32)")
    harness.add_record_argument(ap)
    args = ap.parse_args(argv)
    from gateloop_kernels.chunked import config, states
    sm_count = states._sm_count
    env, rows = harness.environment(), []
    print(f"{'H':>3s} {'T':>6s} {'d':>4s} {'dtype':9s} {'packed':6s} {'one ms':>8s} {'two ms':>8s} "
          f"{'default':>8s} {'diff':>8s}", flush=True)
    for spec in args.shapes.split(","):
        H, T, d = (int(x) for x in spec.split(":"))
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            table = config._CFG[dtype]
            saved = dict(table)
            for packed in (False, True):
                run, leaves, do, N = _case(H, T, d, dtype, packed)
                times, res = {}, {}
                for form, entry in (("one", config._SEARCHED["chunk_states"]), ("two", None), ("default", None)):
                    if form != "default":
                        table["chunk_states"] = table["chunk_states_exact"] = entry
                        states._sm_count = lambda device: 1  # (the rule then always takes the one kernel)
                    else:
                        table.update(saved)
                        states._sm_count = sm_count
                    o = run()
                    res[form] = [o.detach()] + list(torch.autograd.grad(o, leaves, do))
                    times[form] = harness.do_bench(lambda: torch.autograd.backward(run(), do),
                                                   grad_to_none=leaves).median
                table.update(saved)
                diff = max(rel_err(a, b) for a, b in zip(res["one"], res["two"]))
                print(f"{H:3d} {T:6d} {d:4d} {name:9s} {str(packed):6s} {times['one']:8.3f} {times['two']:8.3f} "
                      f"{times['default']:8.3f} {diff:8.1e}", flush=True)
                rows += result_rows(H, T, N, d, name, times, env)
                del run, leaves, do, res
                torch.cuda.empty_cache()
    harness.record("state_forms", rows, args.record)


if __name__ == "__main__":
    main()
