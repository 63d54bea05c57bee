"""The ncu source-page summary (bench/tools/ncu.py) adds up stall samples and shared-memory replays per opcode."""
from bench.tools import ncu as _ncu

_HEAD = ["Address", "Source", "Warp Stall Sampling (All Samples)", "L1 Wavefronts Shared Excessive",
         "L1 Wavefronts Shared", "stall_long_sb", "stall_mio", "stall_mio (Not Issued)"]


def test_sass_summary(tmp_path):
    rows = [["0x1", "STS [R1], R2", "30", "70", "80", "10", "20", "99"],
            ["0x2", "@!P0 STS.128 [R3], R4", "10", "0", "20", "10", "0", "0"],
            ["0x3", "LOP3.LUT R5, R6, 0xffffe000, RZ, 0xc0, !PT", "60", "0", "0", "60", "0", "0"]]
    path = tmp_path / "k.csv"
    path.write_text('"Kernel Name","k",\n' + "\n".join(",".join(f'"{c}"' for c in r) for r in [_HEAD] + rows))
    out = _ncu.summarize(str(path), top=1)
    assert "100 stall samples" in out[0]
    assert "long_sb 80.0%, mio 20.0%" in out[1]  # the "(Not Issued)" column is not counted again
    assert "LOP3 60.0%, STS 40.0%" in out[2]  # a predicated instruction counts under its opcode
    assert "STS 70 / 100" in out[3]
    assert len(out) == 5 and "long_sb" in out[4] and "LOP3.LUT" in out[4]


def test_roofline_table_takes_the_warm_pass(tmp_path):
    """Per kernel name the latter half of its launches is summed; bytes over time against the copy ceiling."""
    tensor = "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed"
    head = ["ID", "Kernel Name", *_ncu._METRICS, tensor]
    units = ["", "", "ns", "byte", "byte", "byte", "%", "", "register/thread", "%"]

    def row(i, name, ns, rd, wr, t):
        return [str(i), name, str(ns), str(rd), str(wr), "0", "10", "5", "128", str(t)]

    rows = [row(0, "_fwd_o", 1e6, 9e9, 9e9, 99),  # cold pass: left out
            row(1, "_state_scan", 1000, 1, 1, 0),
            row(2, "_fwd_o", 2000, 4.25e6, 4.25e6, 30),  # warm: 8.5 MB in 2 us = 100% of the copy ceiling
            row(3, "_state_scan", 1000, 2.125e6, 0, 0)]
    path = tmp_path / "raw.csv"
    path.write_text("==PROF== noise\n" + "\n".join(",".join(f'"{c}"' for c in r) for r in [head, units] + rows))
    out = _ncu.table(str(path), copy_bps=4.25e12)
    fwd = next(x for x in out if x.startswith("_fwd_o")).split()
    assert fwd[1:4] == ["1", "2.0", "8.5"] and fwd[4] == "100.0%" and fwd[6] == "30.0"
    scan = next(x for x in out if x.startswith("_state_scan")).split()
    assert scan[1:5] == ["1", "1.0", "2.1", "50.0%"]
    assert out[-1].split()[1:3] == ["3.0", "10.6"] and tensor in out[-1] and "4.25 TB/s" in out[-1]
