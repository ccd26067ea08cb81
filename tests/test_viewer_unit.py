"""Viewer pieces without a browser: config, safe paths, plot columns, registry, server binding, stored results."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("panel")

from routescope.viewer.config import (ConfigError, UnsafePathError, load_config, parse_config, read_prompts,
                                      safe_path)


# ------------------------------------------------------------------------------- safe paths (issue 6)
@pytest.fixture()
def data_dir(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "prompts.txt").write_text("a\nb\n")
    (root / "sub" / "p.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    os.symlink(tmp_path, root / "escape")
    return root


@pytest.mark.parametrize("bad", ["../secret.txt", "sub/../../secret.txt", "/etc/passwd", "..", "",
                                 "%2e%2e/secret.txt", "%2E%2E%2Fsecret.txt", "%252e%252e/secret.txt",
                                 "sub%2f..%2f..%2fsecret.txt", "..\\secret.txt", "link.txt", "escape/secret.txt",
                                 "~/x", "a\x00b"])
def test_safe_path_refuses_traversal(data_dir, bad):
    with pytest.raises(UnsafePathError):
        safe_path(data_dir, bad)


def test_safe_path_accepts_inside(data_dir):
    assert safe_path(data_dir, "prompts.txt") == (data_dir / "prompts.txt").resolve()
    assert read_prompts(data_dir, "sub/p.jsonl") == ["x"]
    with pytest.raises(UnsafePathError):
        read_prompts(data_dir, "link.txt")


def test_config_validation(tmp_path):
    cfg = load_config(Path(__file__).parents[1] / "examples" / "viewer.yaml")
    assert cfg.default_model == "smollm2-135m" and "float32" in cfg.dtypes
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"modles": []})
    with pytest.raises(ConfigError, match="default_model"):
        parse_config({"models": ["a"], "default_model": "b"})
    with pytest.raises(ConfigError, match="dtype"):
        parse_config({"dtypes": ["int3"]})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    cfg = parse_config({"models": [{"name": "m", "spec": "/x"}], "demo_mode": True, "prompts": ["p"]})
    assert cfg.model("m").spec == "/x" and cfg.demo_mode


# ------------------------------------------------------------------------------- server binding (issue 6)
def test_bind_rules(tmp_path, caplog):
    from routescope.viewer.server import check_bind, read_basic_auth

    assert check_bind("127.0.0.1", False, None) is None
    with pytest.raises(ValueError, match="allow-remote"):
        check_bind("0.0.0.0", False, None)
    with pytest.raises(ValueError, match="basic-auth"):
        check_bind("0.0.0.0", True, None)
    auth = tmp_path / "users"
    auth.write_text("# users\nalice:s3cret\n")
    assert read_basic_auth(auth) == {"alice": "s3cret"}
    with caplog.at_level("WARNING"):
        assert check_bind("0.0.0.0", True, str(auth)) == {"alice": "s3cret"}
    assert any("reachable" in r.message for r in caplog.records)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError):
        read_basic_auth(tmp_path / "empty")


def test_cli_refuses_remote_bind():
    from routescope.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2


# ------------------------------------------------------------------------------- plot columns


def test_layout_and_hit_test(smollm2):
    from routescope.viewer.plot import build_layout, display_token, hit_test, node_xy, route_svg

    g = smollm2.trace("Hello world")
    r = g.route(0.04)
    lay = build_layout(r, g.tokens, g.n_layers, [g.n_tokens - 1])
    assert lay.n_edges == len(r)
    src, dst = r.node_names()
    assert lay.edges["src"] == src and lay.edges["weight"] == [float(w) for w in r.weight]
    assert set(lay.edges["kind"]) <= {"attn", "res_attn", "ffn_in", "ffn_out", "res_ffn"}
    assert display_token(" a\n") == "\u2423a\u21b5"
    out = f"I{g.n_layers - 1}_{g.n_tokens - 1}"
    assert hit_test(lay, *node_xy(out), 50, 20) == ("node", out)
    assert hit_test(lay, 0, lay.top_y, 50, 20) == ("target", 0)
    i = next(i for i, k in enumerate(lay.edges["kind"]) if k == "attn" and lay.x0[i] != lay.x1[i])
    hit = hit_test(lay, (lay.x0[i] + lay.x1[i]) / 2, (lay.y0[i] + lay.y1[i]) / 2, 50, 20)
    assert hit is not None and hit[0] == "edge"
    svg = route_svg(lay)
    assert svg.startswith("<svg") and svg.count("<line") == len(r)
    # threshold moves change the drawn set
    assert len(g.route(0.08)) < len(r)


def test_head_importance(smollm2, tmp_path):
    from routescope.cluster.graph import FlowGraph
    from routescope.cluster.stats import prediction_summary
    from routescope.viewer.plot import head_importance

    gs = [smollm2.trace(p) for p in ("Hello world", "One two")]
    imp = head_importance(gs, 0.04)
    assert imp.shape == (gs[0].n_layers, gs[0].n_heads)
    assert ((imp >= 0) & (imp <= 1)).all() and imp.max() > 0
    # loaded graphs give the same answer
    paths = [g.save(tmp_path / f"{i}.msgpack") for i, g in enumerate(gs)]
    assert np.array_equal(head_importance([FlowGraph.load(p) for p in paths], 0.04), imp)
    # one definition (SPEC 8, cluster.stats): the share of graphs whose last-position summary marks the head
    for mode in ("renormalize", "plain"):
        want = np.mean([prediction_summary(g.edges, 0.04, mode).head_important[0] for g in gs], axis=0)
        assert np.array_equal(head_importance(gs, 0.04, mode), want), mode


# ------------------------------------------------------------------------------- datasets (cluster.datasets)
def test_list_datasets_never_offers_results(tmp_path):
    from routescope.viewer.config import list_datasets

    root = tmp_path / "data"
    (root / "job").mkdir(parents=True)
    for name, text in (("manifest.json", "{}"), ("failed.json", "[]"), ("notes.txt", "a note\n")):
        (root / "job" / name).write_text(text)
    (root / "prompts.txt").write_text("a\n")
    (root / "sub").mkdir()
    (root / "sub" / "p.tsv").write_text("prompt\tid\nx\t1\n")
    assert list_datasets([root]) == [("data", "prompts.txt"), ("data", "sub/p.tsv")]
    assert list_datasets([root / "job"]) == []  # a results directory configured as a data dir


def test_unreadable_datasets_are_reported_per_file(tmp_path):
    from routescope.viewer.config import ViewerConfig, list_datasets

    root = tmp_path / "data"
    root.mkdir()
    files = {
        "nocol.csv": ("text\nhello\n", "dataset nocol.csv: no column 'prompt'"),
        "scalar.json": ("5", "dataset scalar.json: a .json dataset is an array of records, not a number"),
        "object.json": ('{"prompt": "x"}', "dataset object.json: a .json dataset is an array of records, not an object"),
        "deep.json": ("[" * 100_000 + "]" * 100_000, "dataset deep.json: JSON nested too deeply"),
        "deep.jsonl": ('{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n",
                       "dataset deep.jsonl holds no usable prompts (line 1: JSON nested too deeply)"),
        "nofield.jsonl": ('{"text": "x"}\n', "dataset nofield.jsonl holds no usable prompts (line 1: no text field 'prompt')"),
        "broken.json": ('["a", ', "dataset broken.json: not valid JSON"),
    }
    for name, (text, _) in files.items():
        (root / name).write_text(text)
    (root / "good.json").write_text('[{"prompt": "first"},\n "second", {"prompt": 3}, [["x"]]]')
    listed = {rel for _, rel in list_datasets([root])}
    assert listed == set(files) | {"good.json"}
    for name, (_, msg) in files.items():
        with pytest.raises(ValueError) as err:
            read_prompts(root, name)
        assert str(err.value).startswith(msg), (name, str(err.value))
    assert read_prompts(root, "good.json") == ["first", "second"]
    app = _app(ViewerConfig(data_dirs=[root], prompts=["configured"], demo_mode=True))
    assert app.allowed_prompts() == {"configured", "first", "second"}  # the bad files cost nothing else


# ------------------------------------------------------------------------------- registry
def test_registry_bounds_and_reload():
    from routescope.cluster.pipelines import PipelineCache
    from routescope.viewer.models import LRUBytes, ModelRegistry

    calls = []

    def loader(spec, device, dtype):
        calls.append((spec, device, dtype))
        return SimpleNamespace(info=SimpleNamespace(n_params=1000))

    reg = ModelRegistry(pipeline_cache=PipelineCache(max_bytes=9_000), loader=loader)
    a = reg.get("m", "cpu", "float32")
    assert reg.get("m", "cpu", "float32") is a and len(calls) == 1
    b = reg.get("m", "cpu", "bfloat16")  # a precision switch really reloads
    assert b is not a and calls[-1] == ("m", "cpu", "bfloat16")
    reg.get("n", "cpu", "float32")
    assert reg.model_cache.n_bytes <= 9_000 and not reg.is_loaded("m", "cpu", "float32")  # LRU evicted
    lru = LRUBytes(100, len)
    for i in range(20):
        lru.put(i, "x" * 30)
    assert lru.n_bytes <= 100 and len(lru) == 3


# ------------------------------------------------------------------------------- app without a server
@pytest.fixture()
def results_dir(tmp_path, smollm2):
    data = tmp_path / "data"
    res = data / "job1"
    (res / "shard").mkdir(parents=True)
    smollm2.trace("Hello world").save(res / "a.msgpack")
    smollm2.trace("One two").save(res / "shard" / "b.msgpack")
    (res / "manifest.json").write_text(json.dumps({"prompts": 2}))
    (data / "bad").mkdir()
    (data / "bad" / "x.msgpack").write_bytes(b"not msgpack at all")
    return data


def _app(cfg):
    from routescope.viewer.app import ViewerApp
    from routescope.viewer.models import ModelRegistry

    return ViewerApp(cfg, ModelRegistry(max_tokens=cfg.max_tokens))


def test_stored_results(results_dir):
    from routescope.viewer.config import ViewerConfig

    app = _app(ViewerConfig(data_dirs=[results_dir]))
    app.panel()
    files = app.open_results(relative="data/job1")
    assert files == ["a.msgpack", "shard/b.msgpack"]
    assert app._stored["importance"].shape == (30, 9)
    app.open_stored("shard/b.msgpack")
    assert app.graph is not None and app.graph.prompt == "One two" and app.layout.n_edges > 0
    app.select(f"node:I29_{app.graph.n_tokens - 1}")
    assert app.detail["kind"] == "stored"  # no live model: contributions only, no crash
    for bad, msg in (("data/missing", "does not exist"), ("data/../..", "not accepted"),
                     ("data/%2e%2e", "URL-encoded"), ("data/bad", "could be read"), ("other/x", "not a configured")):
        app.error.visible = False
        app.open_results(relative=bad)
        assert app.error.visible and msg in app.error.object, (bad, app.error.object)


def test_demo_mode_and_empty_prompt():
    from routescope.viewer.config import ViewerConfig

    app = _app(ViewerConfig(prompts=["allowed"], demo_mode=True))
    assert app.w_prompt.disabled
    with pytest.raises(ValueError, match="Demo mode"):
        app.check_prompt("something else")
    assert app.check_prompt("allowed") == "allowed"
    with pytest.raises(ValueError, match="empty"):
        app.check_prompt("  ")


def test_url_state_roundtrip(smollm2):
    from routescope.viewer.config import ViewerConfig

    app = _app(ViewerConfig())
    app.panel()
    assert app.apply_query({"model": "smollm2-135m", "prompt": "Hello world", "tau": "0.06", "sel": "node:I29_2"})
    assert app.w_prompt.value == "Hello world" and abs(app.w_tau.value - 0.06) < 1e-9
    g = smollm2.trace("Hello world")
    app.set_graph(g, app.reg.get("smollm2-135m"))
    app.apply_pending()
    assert app.state.sel == "node:I29_2" and app.detail["kind"] == "residual"
    assert "sel=node%3AI29_2" in app.link.object and "tau=0.060" in app.link.object
