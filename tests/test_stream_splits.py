"""The streaming decode kernel's k-split choice (choose_splits in hf_int4/csrc/stream_gemm.cuh), on the host.

The split count decides the grid and how many fp32 partials land in the workspace, so beyond speed it must never
ask for more partial slots than the workspace holds. A small host program (nvcc, no GPU) prints the choice for a
grid of layer shapes, SM counts and workspace sizes; the properties below are checked on every one of them.
"""
import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
CSRC = Path(__file__).resolve().parents[1] / "hf_int4" / "csrc"
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc (CPU only)")

PROGRAM = r"""
#include <cstdio>
#include "stream_gemm.cuh"
int main() {
  using namespace hf_int4::gemm::stream;
  printf("%d %d\n", kWarps, kPartFloats);
  int col_tiles, chunks, sms, forced;
  long long partial;
  while (scanf("%d %d %d %d %lld", &col_tiles, &chunks, &sms, &forced, &partial) == 5)
    printf("%d\n", choose_splits(col_tiles, chunks, sms, forced, partial));
}
"""


@pytest.fixture(scope="module")
def choose(tmp_path_factory):
    """choose(cases) -> (kWarps, kPartFloats, [splits per case]); a case is (col_tiles, chunks, sms, forced, floats)."""
    d = tmp_path_factory.mktemp("splits")
    (d / "p.cu").write_text(PROGRAM)
    subprocess.run([NVCC, "-std=c++17", "-O1", "-I", str(CSRC), str(d / "p.cu"), "-o", str(d / "p")], check=True)

    def run(cases):
        text = "\n".join(" ".join(map(str, c)) for c in cases) + "\n"
        out = subprocess.run([str(d / "p")], input=text, capture_output=True, text=True, check=True).stdout.split()
        return int(out[0]), int(out[1]), [int(v) for v in out[2:]]

    return run


# column tiles (N / 64 or N / 32) and chunks (K / 128 .. K / 16) of real layers, and tiny ones
COL_TILES = [1, 2, 16, 64, 96, 128, 224, 448, 896]
CHUNKS = [1, 3, 8, 32, 64, 112, 512]
SMS = [1, 8, 132]
ROOMY = 1 << 40


def test_automatic_splits(choose):
    cases = [(c, k, s, -1, ROOMY) for c, k, s in itertools.product(COL_TILES, CHUNKS, SMS)]
    warps, _, got = choose(cases)
    for (col_tiles, chunks, sms, _, _), s in zip(cases, got):
        ctx = f"col_tiles={col_tiles} chunks={chunks} sms={sms}: splits={s}"
        assert s >= 1 and s & (s - 1) == 0, f"{ctx}: not a power of two (uneven splits were 1.2-1.8x slower)"
        if s > 1:
            assert col_tiles * s <= 2 * sms, f"{ctx}: more than one wave of two CTAs per SM"
            assert chunks // s >= warps // 2, f"{ctx}: fewer than half a chunk per warp"
    # the shapes measured on the H200 (132 SMs, 64-column CTAs, chunks of 128 rows)
    _, _, measured = choose([(128, 64, 132, -1, ROOMY), (64, 112, 132, -1, ROOMY), (64, 32, 132, -1, ROOMY),
                             (224, 32, 132, -1, ROOMY), (448, 32, 132, -1, ROOMY)])
    assert measured == [2, 4, 4, 1, 1]  # 8192^2, 14336x4096, 4096^2, 4096x14336, 4096x28672


def test_forced_splits_and_the_workspace_bound(choose):
    _, part, _ = choose([])
    cases = []
    for col_tiles, chunks, forced in itertools.product([1, 16, 128], [3, 64], [-1, 1, 2, 3, 7, 100]):
        for slots in (1, 2, 5, 64, 10**6):  # partial slots the workspace holds
            cases.append((col_tiles, chunks, 132, forced, slots * part))
    _, _, got = choose(cases)
    for (col_tiles, chunks, _, forced, floats), s in zip(cases, got):
        ctx = f"col_tiles={col_tiles} chunks={chunks} forced={forced} room={floats // part} slots: splits={s}"
        assert s >= 1, ctx
        if s > 1:
            assert s * col_tiles * part <= floats, f"{ctx}: more partials than the workspace holds"
        if forced > 0:
            fits = min(forced, chunks) * col_tiles * part <= floats
            assert s <= min(forced, chunks), ctx
            assert s == min(forced, chunks) or not fits, f"{ctx}: a forced split that fits was not taken"
