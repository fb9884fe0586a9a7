"""Reports say where: each tensor at its own source line, with the op's shape;
stdlib files by a stable name; per op its share of the step, FLOPs and the
workers it keeps busy."""
from __future__ import annotations

import popdsl

CHAIN = """graph g(tiles = 64) {
    input x: f32[16, 4096];
    input a: f32[4096, 64];
    input b: f32[64, 4096];
    input c: f32[4096, 64];
    let p = x @ a;
    let q = p @ b;
    let r = q @ c;
    output r;
}
"""


def test_temporaries_point_at_their_own_line_and_have_the_ops_shape():
    # Without outlining: p and r are alike, one function's two calls otherwise.
    exe = popdsl.compile(CHAIN, outline=False)
    by_line: dict[int, list] = {}
    for t in exe.ir.tensors:
        if t.kind == "temp":
            by_line.setdefault(t.span.line, []).append(t)
    # Both split matmuls (p and r reduce over 4096) leave partial sums on their own line.
    partial = {line for line, ts in by_line.items() for t in ts if t.name.endswith(".partial")}
    assert partial == {6, 8}, by_line
    shapes = {t.span.line: t.shape for ts in by_line.values() for t in ts if not t.name.endswith(".partial")}
    assert shapes[6] == (16, 64) and shapes[7] == (16, 4096) and shapes[8] == (16, 64)
    rows = {r["source"].rsplit(":", 2)[-2]: r for r in exe.memory_report().largest_tensors(20) if r["kind"] == "temp"}
    assert rows["6"]["shape"] in ([16, 64], [8, 16, 64]) and rows["8"]["shape"] in ([16, 64], [8, 16, 64])


def test_stdlib_sources_are_named_the_same_wherever_popdsl_is_installed():
    exe = popdsl.compile("import \"popnn\";\ngraph g(tiles = 4) { input x: f32[2, 8]; output y = softmax(x); }")
    sources = {op["source"] for op in exe.ir.ops}
    assert any(s.startswith("<stdlib>/popnn.pop:") for s in sources), sources
    assert not any("site-packages" in s or s.startswith("/") for s in sources), sources


def test_partition_report_gives_share_flops_and_worker_occupancy():
    exe = popdsl.compile("graph g(tiles = 8) {\n    input a: f32[64, 64];\n    input b: f32[64, 64];\n"
                         "    output y = relu(a @ b);\n}\n")
    rep = exe.partition_report()
    rows = {r["op"]: r for r in rep.rows}
    mm = rows["matmul"]
    assert mm["flops"] == 2 * 64 * 64 * 64
    assert 0 < mm["cycle_share"] <= 1 and abs(sum(r["cycle_share"] for r in rep.rows) - 1) < 0.05
    assert 1 <= mm["workers_busy"] <= 6 and mm["gflops_per_s"] > 0
    assert rows["relu"]["flops"] == 64 * 64
    text = rep.text()
    assert "share" in text and "workers" in text and "GFLOP/s" in text
    assert rep.to_json()["step_compute_cycles"] > 0


def test_ops_and_kernels_are_named_by_where_they_come_from():
    exe = popdsl.compile("import \"popnn\";\ndef block(x: f32[B, I]) -> f32[B, 16] {\n"
                         "    return relu(dense(x, 16) * 2.0);\n}\n"
                         "graph g(tiles = 4) { input x: f32[2, 8]; output y = block(block(x)); }")
    names = {op["name"] for op in exe.ir.ops}
    assert {"block_1.dense_1.matmul", "block_2.dense_1.matmul"} <= names, names
    fused = [c for c in exe.ir.codelets if c.startswith("fused_")]
    assert any(c.startswith("fused_add_mul_relu_") for c in fused), fused
    assert any(cs.name.startswith("block_2.dense_1.matmul") for cs in exe.ir.compute_sets)
    text = exe.partition_report().text()
    assert "block_1.dense_1.matmul" in text
