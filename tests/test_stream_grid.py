"""The streaming decode kernel's grid choice (choose_grid in hf_int4/csrc/stream_gemm.cuh), on the host.

The grid decides the CTA shape, the k-splits and how many fp32 partials land in the workspace, so beyond speed it
must never ask for more partial slots than the workspace holds. A small host program (nvcc, no GPU) prints the choice
for a grid of layer shapes, SM counts and workspace sizes; the properties below are checked on every one of them.
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
  printf("%d\n", kPartFloats);
  int n_pad, chunks, max_atoms, sms, forced, m;
  long long partial;
  while (scanf("%d %d %d %d %d %lld %d", &n_pad, &chunks, &max_atoms, &sms, &forced, &partial, &m) == 7) {
    const Grid g = choose_grid(n_pad, chunks, max_atoms, sms, forced, partial, m);
    printf("%d %d %d %d\n", g.warps, g.atoms, g.splits, g.wn);
  }
}
"""


@pytest.fixture(scope="module")
def choose(tmp_path_factory):
    """choose(cases) -> (kPartFloats, [(warps, atoms, splits, wn) per case]); a case is
    (n_pad, chunks, max_atoms, sms, forced, floats, m)."""
    d = tmp_path_factory.mktemp("grid")
    (d / "p.cu").write_text(PROGRAM)
    subprocess.run([NVCC, "-std=c++17", "-O1", "-I", str(CSRC), str(d / "p.cu"), "-o", str(d / "p")], check=True)

    def run(cases):
        text = "\n".join(" ".join(map(str, c)) for c in cases) + "\n"
        out = [int(v) for v in subprocess.run([str(d / "p")], input=text, capture_output=True, text=True,
                                              check=True).stdout.split()]
        return out[0], [tuple(out[i:i + 4]) for i in range(1, len(out), 4)]

    return run


# padded N and chunks (K / 128 .. K / 16) of real layers, and tiny ones
N_PAD = [128, 256, 1024, 4096, 6144, 8192, 14336, 28672, 57344]
CHUNKS = [1, 3, 8, 32, 64, 112, 512]
SMS = [1, 8, 132]
ROOMY = 1 << 40


def test_automatic_grid(choose):
    cases = [(n, k, a, s, -1, ROOMY, m) for n, k, a, s, m in itertools.product(N_PAD, CHUNKS, (2, 4), SMS, (1, 8))]
    _, got = choose(cases)
    for (n_pad, chunks, max_atoms, sms, _, _, m), (warps, atoms, s, wn) in zip(cases, got):
        ctx = (f"n_pad={n_pad} chunks={chunks} max_atoms={max_atoms} sms={sms} m={m}: {warps} warps, {atoms} atoms, "
               f"{s} splits, {wn} groups")

        def in_range(a, groups=1):  # the 16-warp grid's condition: whole tiles of `groups` x `a` atoms in (sms / 2, sms]
            cols = 16 * a * groups
            return n_pad % cols == 0 and sms < 2 * (n_pad // cols) <= 2 * sms

        def grouped(groups):  # tiles of groups x max_atoms atoms fit where the max_atoms tiles outnumber the SMs
            return n_pad // (16 * max_atoms) > sms and in_range(max_atoms, groups) and chunks >= 16 // groups

        assert atoms in (2, 3, 4) and atoms <= max_atoms, ctx
        # 48-column tiles exactly where they and the 64-column ones both fill the SMs
        assert (atoms == 3) == (max_atoms == 4 and in_range(4) and in_range(3)), ctx
        assert atoms != 3 or (warps, s, wn) == (16, 1, 1), ctx
        if warps == 16:  # one CTA per column tile over all of K, one wave
            assert s == 1 and in_range(atoms, wn), ctx
            if atoms == 2 and max_atoms == 4:  # 32-column tiles: at most two chunks per warp, any number at M = 1
                assert wn == 1 and not in_range(max_atoms) and (chunks <= 2 * warps or m == 1), ctx
            if wn > 1:  # groups of warps along N: only where no single-group tile fits, the fewest groups that do
                assert wn in (2, 4) and atoms == max_atoms and not in_range(max_atoms), ctx
                assert grouped(wn) and all(not grouped(w) for w in (2, 4) if w < wn), ctx
        else:
            assert warps == 8 and atoms == max_atoms and wn == 1, ctx
            assert not in_range(max_atoms), f"{ctx}: the 16-warp grid fits"
            assert not (in_range(2) and (chunks <= 32 or m == 1)), f"{ctx}: the 16-warp grid of 32-column tiles fits"
            assert not grouped(2) and not grouped(4), f"{ctx}: the grouped 16-warp grid fits"
            assert s >= 1 and s & (s - 1) == 0, f"{ctx}: not a power of two (uneven splits were 1.2-1.8x slower)"
            if s > 1:
                assert n_pad // (16 * atoms) * s <= 2 * sms, f"{ctx}: more than one wave of two CTAs per SM"
                assert chunks // s >= warps // 2, f"{ctx}: fewer than half a chunk per warp"
    assert any(g[1] == 3 for g in got), "no case reaches the 48-column tiles"
    # the shapes measured on the H200 and H100 (132 SMs, chunks of 128 rows), M = 8
    _, measured = choose([(n, chunks, 4, 132, -1, ROOMY, 8) for n, chunks in
                          [(8192, 64), (6144, 32), (4096, 32), (4096, 112), (14336, 32), (28672, 32)]])
    # 8192^2, 4096x6144 (48 columns), 4096^2 (32 columns): one 16-warp CTA per tile; 14336x4096: 8-warp CTAs, 4
    # splits; 4096x14336, 4096x28672: 16-warp CTAs of two and four groups of warps
    assert measured == [(16, 4, 1, 1), (16, 3, 1, 1), (16, 2, 1, 1), (8, 4, 4, 1), (16, 4, 1, 2), (16, 4, 1, 4)]
    # M = 1: 14336x4096 and 8192x4096 take one 16-warp CTA per 32-column tile, no split (H100: 5.8% and 9% faster)
    assert choose([(4096, 112, 4, 132, -1, ROOMY, 1), (4096, 64, 4, 132, -1, ROOMY, 1)])[1] == [(16, 2, 1, 1)] * 2


def test_forced_splits_and_the_workspace_bound(choose):
    part, _ = choose([])
    cases = []
    for n_pad, chunks, forced in itertools.product([64, 1024, 8192], [3, 64], [-1, 1, 2, 3, 7, 100]):
        for slots in (1, 2, 5, 64, 10**6):  # partial slots the workspace holds
            cases.append((n_pad, chunks, 4, 132, forced, slots * part, 8))
    _, got = choose(cases)
    for (n_pad, chunks, _, _, forced, floats, _), (warps, atoms, s, wn) in zip(cases, got):
        ctx = f"n_pad={n_pad} chunks={chunks} forced={forced} room={floats // part} slots: {warps} warps, {s} splits"
        col_tiles = n_pad // (16 * atoms * wn)
        assert s >= 1 and (wn == 1 or s == 1), ctx
        if s > 1:
            assert s * col_tiles * part <= floats, f"{ctx}: more partials than the workspace holds"
        if forced > 0:
            fits = min(forced, chunks) * col_tiles * part <= floats
            assert warps == 8 and s <= min(forced, chunks), ctx
            assert s == min(forced, chunks) or not fits, f"{ctx}: a forced split that fits was not taken"
