"""The ncu source-page summary (bench/_ncu.py) adds up stall samples and shared-memory replays per opcode."""
from bench import _ncu

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
