"""TensorRT: engine profiles from the specs, the builder per TensorRT major and precision, the
manifest's `trt` check, ONNX Runtime's TensorRT EP options, and the `trt` graph backend.

CPU tier: everything up to the device call, with a small fake `tensorrt` (and cuda-python) module
injected into sys.modules that records what the code asks of it. GPU tier (`-m gpu`): real builds
of the tiny engine folder, compared with ONNX Runtime on the CPU; skipped with the reason when
TensorRT or a GPU is absent.
"""
from __future__ import annotations

import ctypes
import json
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from finers_rt.backends import BackendUnavailable
from finers_rt.backends.ort import TensorrtEP, expected_digests, providers_for, tensorrt_options
from finers_rt.backends.ort_session import resolve_providers
from finers_rt.export import trt_build
from finers_rt.manifest import FORMAT_VERSION, MANIFEST, StaleEngineError, write_manifest
from finers_rt.qwen_vision_host import VisionPreprocessConfig, vision_dims, vision_inputs
from finers_rt.specs import SAM2_DECODER, SAM2_ENCODER, VISION, GraphSpec, TensorSpec, profile_shapes
from finers_rt.trt_engines import TRT_GRAPHS, check_trt_section, graph_profile

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "sm": "9.0"}
REBUILD = r"finers-rt build --engines .* --target trt --precision fp16 --max-batch 1 --workspace-gb 4"
VISION_CONFIG = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112}
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}  # Qwen2.5-VL-7B-Instruct's


def _engine_folder(root: Path, precision: str = "fp32") -> Path:
    """An engine folder as `finers-rt export` lays it out, with empty graph files (b"" is an empty
    ONNX ModelProto; the manifest check reads digests and file presence, the fake TensorRT never
    opens the graphs)."""
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "vocab_size": 1000, "vision_config": VISION_CONFIG}
    for stage in ("gse", "lpr"):
        (root / stage).mkdir(parents=True)
        (root / stage / "config.json").write_text(json.dumps(config))
        (root / stage / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (root / "sam2").mkdir()
    digests = expected_digests(root)
    for rel in digests:
        (root / rel).write_bytes(b"")
    write_manifest(root, {"format": FORMAT_VERSION, "precision": precision, "checkpoints": "/ckpt",
                          "graphs": {rel: {"spec_digest": d} for rel, d in digests.items()}})
    return root


# ---- fake TensorRT for the builder -------------------------------------------------------------


def _fake_builder_trt(version: str) -> types.ModuleType:
    """A `tensorrt` module with the 10.x or 11.x builder surface; `trt.calls` records every call.

    11.x has no FP16/BF16/INT8/FP8 builder flags and no EXPLICIT_BATCH (as in TensorRT 11.1's
    Python bindings), so a weak-typing call on 11 fails here as it would there.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__, calls = version, []
    trt.calls = calls
    weak = int(version.split(".")[0]) < 11
    trt.BuilderFlag = SimpleNamespace(TF32="TF32", **({f: f for f in ("FP16", "BF16", "INT8", "FP8")} if weak else {}))
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1, **({"EXPLICIT_BATCH": 0} if weak else {}))
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.Logger = type("Logger", (), {"WARNING": "WARNING", "__init__": lambda self, level: None})

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return SimpleNamespace()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return b"plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


def _per_graph(calls: list) -> list[list]:
    """The recorded calls split per engine build (each starts with create_network)."""
    builds = []
    for call in calls:
        if call[0] == "create_network":
            builds.append([])
        builds[-1].append(call)
    return builds


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """build(version, precision=..., folder_precision=...) -> (fake trt, engine folder, trt section)."""
    monkeypatch.setattr(trt_build, "device_info", lambda: dict(H100))

    def build(version: str, *, folder_precision: str = "fp32", **kw):
        trt = _fake_builder_trt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        folder = _engine_folder(tmp_path / f"eng-{len(list(tmp_path.iterdir()))}", folder_precision)
        return trt, folder, trt_build.build_engines(folder, **kw)

    return build


# ---- profiles -----------------------------------------------------------------------------------


def test_vision_dims_are_the_shapes_vision_inputs_feeds():
    cfg = VisionPreprocessConfig(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                 merge_size=2, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, window_size=112)
    for w, h in [(1920, 1080), (512, 512), (517, 333)]:
        feeds, _, _ = vision_inputs(np.zeros((h, w, 3), np.uint8), cfg)
        dims = vision_dims(cfg, w, h)
        assert dims == {"num_patches": feeds["pixel_values"].shape[0],
                        "num_windows": feeds["win_gather"].shape[0], "window_len": feeds["win_gather"].shape[1]}
    assert vision_dims(cfg, 1920, 1080) == {"num_patches": 10764, "num_windows": 180, "window_len": 64}
    assert vision_dims(cfg, 512, 512) == {"num_patches": 1296, "num_windows": 25, "window_len": 64}


@pytest.mark.parametrize("stage,patches,windows", [("gse", 10764, 180), ("lpr", 1296, 25)])
def test_vision_profile_is_the_spec_range_with_the_stage_shape_as_opt(tmp_path, stage, patches, windows):
    profile = graph_profile(_engine_folder(tmp_path), f"{stage}/vision.onnx")
    (pmin, _, pmax), (wmin, _, wmax) = VISION.profiles["num_patches"], VISION.profiles["num_windows"]
    assert profile["pixel_values"] == ((pmin, 1176), (patches, 1176), (pmax, 1176))
    assert profile["pos_ids"][1] == (patches, 2) and profile["win_scatter"][1] == (patches,)
    assert profile["win_gather"] == ((wmin, 64), (windows, 64), (wmax, 64)) == profile["win_mask"]
    assert pmin <= patches <= pmax and wmin <= windows <= wmax


def test_sam2_profiles_are_the_specs(tmp_path):
    folder = _engine_folder(tmp_path)
    assert graph_profile(folder, "sam2/sam2_encoder.onnx") == {}  # static: TensorRT needs no profile
    lo, opt, hi = SAM2_DECODER.profiles["num_points"]
    assert graph_profile(folder, "sam2/sam2_decoder.onnx") == {
        "point_coords": ((1, lo, 2), (1, opt, 2), (1, hi, 2)), "point_labels": ((1, lo), (1, opt), (1, hi))}


def test_profile_opt_outside_the_spec_is_refused():
    with pytest.raises(ValueError, match=r"num_patches=20000 is outside the profile \[1296, 10764\]"):
        profile_shapes(VISION, {"num_patches": 20000})
    with pytest.raises(ValueError, match="no dynamic dim 'batch'"):
        profile_shapes(VISION, max_batch=2)


# ---- builder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision,flags", [("fp16", ["FP16"]), ("bf16", ["BF16"]), ("fp32", [])])
def test_trt10_builds_weakly_typed_with_precision_flags(fake_build, precision, flags):
    trt, folder, section = fake_build("10.16.1.11", precision=precision, workspace_gb=2)
    builds = _per_graph(trt.calls)
    assert len(builds) == len(TRT_GRAPHS) == 4
    for rel, calls in zip(TRT_GRAPHS, builds):
        assert calls[0] == ("create_network", 0)  # weakly typed, EXPLICIT_BATCH implied since 10.0
        assert calls[1] == ("parse_from_file", str(folder / rel))
        assert ("set_memory_pool_limit", "WORKSPACE", 2 << 30) in calls
        assert [c[1] for c in calls if c[0] == "set_flag"] == flags
        assert (("clear_flag", "TF32") in calls) == (precision == "fp32")
        shapes = {c[1]: c[2:] for c in calls if c[0] == "set_shape"}
        assert shapes == {k: tuple(v) for k, v in graph_profile(folder, rel).items()}
        assert ("add_optimization_profile",) in calls or not shapes
        assert (folder / section["engines"][rel]["file"]).read_bytes() == b"plan"
    assert not [c for c in builds[2] if c[0] == "set_shape"]  # the SAM2 encoder is static


def test_trt10_profiles_per_stage(fake_build):
    trt, _, _ = fake_build("10.16.1.11")
    gse, lpr = ({c[1]: c[2:] for c in b if c[0] == "set_shape"} for b in _per_graph(trt.calls)[:2])
    assert gse["pixel_values"] == ((1296, 1176), (10764, 1176), (10764, 1176))
    assert lpr["pixel_values"] == ((1296, 1176), (1296, 1176), (10764, 1176))
    assert lpr["win_gather"][1] == (25, 64) and gse["win_gather"][1] == (180, 64)


def _qdq_bytes() -> bytes:
    onnx = pytest.importorskip("onnx", reason="the Q/DQ check reads the graph with onnx")
    q = onnx.helper.make_node("QuantizeLinear", ["x", "s"], ["q"])
    return onnx.helper.make_model(onnx.helper.make_graph([q], "g", [], [])).SerializeToString()


def _add_qdq_section(folder: Path, *, stale: str | None = None, precision: str = "int8", legacy: bool = False) -> None:
    """What `finers_rt.export.qdq.export_qdq` records: a Q/DQ file per TensorRT graph + the fp32 graph's
    hash, in the manifest's `qdq` section for `precision` (legacy: the one-section form of int8-only folders)."""
    from finers_rt.export.qdq import file_sha256, qdq_file

    manifest = json.loads((folder / MANIFEST).read_text())
    graphs = {}
    for rel in TRT_GRAPHS:
        (folder / qdq_file(rel, precision)).write_bytes(_qdq_bytes())
        graphs[rel] = {"file": qdq_file(rel, precision),
                       "source_sha256": stale if rel == stale else file_sha256(folder / rel)}
    section = {"precision": precision, "graphs": graphs}
    manifest["qdq"] = section if legacy else {precision: section}
    write_manifest(folder, manifest)


def test_trt10_int8_needs_qdq_graphs(fake_build, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"explicitly quantized.*run `finers-rt export .*--qdq int8"):
        fake_build("10.16.1.11", precision="int8")  # the folder records no Q/DQ graphs
    (tmp_path / "q.onnx").write_bytes(_qdq_bytes())
    assert trt_build.has_qdq(tmp_path / "q.onnx")


def _qdq_build(monkeypatch, tmp_path, version: str, precision: str = "int8", **section):
    monkeypatch.setattr(trt_build, "device_info", lambda: dict(H100))
    trt = _fake_builder_trt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    folder = _engine_folder(tmp_path / "eng")
    _add_qdq_section(folder, precision=precision, **section)
    return trt, folder, trt_build.build_engines(folder, precision=precision)


@pytest.mark.parametrize("version,network,flags", [("10.16.1.11", 0, ["INT8", "FP16"]), ("11.4.0.106", 1 << 1, [])])
def test_int8_builds_the_qdq_graphs_of_the_manifest(monkeypatch, tmp_path, version, network, flags):
    trt, folder, section = _qdq_build(monkeypatch, tmp_path, version)
    for rel, calls in zip(TRT_GRAPHS, _per_graph(trt.calls)):
        assert calls[0] == ("create_network", network)  # weakly typed on 10, strongly typed on 11
        assert calls[1] == ("parse_from_file", str(folder / rel.replace(".onnx", ".int8.onnx")))
        assert [c[1] for c in calls if c[0] == "set_flag"] == flags  # 11: the Q/DQ graph's own types
        assert section["engines"][rel]["onnx"] == rel.replace(".onnx", ".int8.onnx")
        assert section["engines"][rel]["file"] == rel.replace(".onnx", ".engine")
        assert section["engines"][rel]["precision"] == "int8"
    assert section["precision"] == "int8"


VISION_GRAPHS = ("gse/vision.onnx", "lpr/vision.onnx")


def test_fp8_builds_the_vision_towers_from_fp8_graphs_and_sam2_in_fp16(monkeypatch, tmp_path):
    trt, folder, section = _qdq_build(monkeypatch, tmp_path, "10.16.1.11", "fp8")
    for rel, calls in zip(TRT_GRAPHS, _per_graph(trt.calls)):
        fp8 = rel in VISION_GRAPHS
        parsed = rel.replace(".onnx", ".fp8.onnx") if fp8 else rel
        assert calls[1] == ("parse_from_file", str(folder / parsed))
        assert [c[1] for c in calls if c[0] == "set_flag"] == (["FP8", "FP16"] if fp8 else ["FP16"])
        assert section["engines"][rel]["onnx"] == parsed
        assert section["engines"][rel]["precision"] == ("fp8" if fp8 else "fp16")
    assert section["precision"] == "fp8"


def test_fp8_on_trt11_converts_sam2_to_fp16_and_builds_the_fp8_graphs_as_typed(monkeypatch, tmp_path):
    converted = []

    def to_fp16(path, dst):
        converted.append(Path(path).relative_to(tmp_path / "eng").as_posix())
        Path(dst).write_bytes(b"fp16")

    monkeypatch.setattr("finers_rt.export.quantize.to_fp16", to_fp16)
    trt, folder, section = _qdq_build(monkeypatch, tmp_path, "11.4.0.106", "fp8")
    assert converted == ["sam2/sam2_encoder.onnx", "sam2/sam2_decoder.onnx"]
    for rel, calls in zip(VISION_GRAPHS, _per_graph(trt.calls)):
        assert calls[1] == ("parse_from_file", str(folder / rel.replace(".onnx", ".fp8.onnx")))
        assert not [c for c in calls if c[0] == "set_flag"]


def test_int8_reads_the_one_section_manifest_of_older_folders(monkeypatch, tmp_path):
    _, folder, section = _qdq_build(monkeypatch, tmp_path, "10.16.1.11", legacy=True)
    assert section["engines"]["gse/vision.onnx"]["onnx"] == "gse/vision.int8.onnx"


def test_int8_refuses_qdq_graphs_of_another_fp32_graph(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"quantized from another sam2/sam2_decoder.onnx.*--qdq int8"):
        _qdq_build(monkeypatch, tmp_path, "10.16.1.11", stale="sam2/sam2_decoder.onnx")


def test_fp8_needs_fp8_qdq_graphs_not_the_int8_ones(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"records none for gse/vision.onnx.*--qdq fp8"):
        monkeypatch.setattr(trt_build, "device_info", lambda: dict(H100))
        monkeypatch.setitem(sys.modules, "tensorrt", _fake_builder_trt("10.16.1.11"))
        folder = _engine_folder(tmp_path / "eng")
        _add_qdq_section(folder, precision="int8")
        trt_build.build_engines(folder, precision="fp8")


def test_trt11_fp16_builds_strongly_typed_from_converted_graphs(fake_build, monkeypatch):
    converted = []
    def to_fp16(path, dst):
        converted.append((Path(path), Path(dst)))
        Path(dst).write_bytes(b"fp16")

    monkeypatch.setattr("finers_rt.export.quantize.to_fp16", to_fp16)
    trt, folder, section = fake_build("11.4.0.106", precision="fp16")
    for rel, calls in zip(TRT_GRAPHS, _per_graph(trt.calls)):
        assert calls[0] == ("create_network", 1 << 1)  # 1 << STRONGLY_TYPED
        assert not [c for c in calls if c[0] in ("set_flag", "clear_flag")]  # no precision flags in 11
        parsed = Path(calls[1][1])
        assert (folder / rel, parsed) in converted and parsed.name.endswith(Path(rel).name)
    assert len(converted) == 4 and not any(dst.exists() for _, dst in converted)  # temporary copies, removed
    assert section["strongly_typed"] and section["tensorrt"] == "11.4.0.106"


def test_fp16_copy_for_trt11_leaves_the_folder_graph_untouched(tmp_path):
    onnx = pytest.importorskip("onnx", reason="the fp16 conversion needs onnx")
    from onnx import TensorProto, helper, numpy_helper

    from finers_rt.export.quantize import to_fp16

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w])
    src, dst = tmp_path / "vision.onnx", tmp_path / "copy.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    before = src.read_bytes()
    to_fp16(src, dst)
    assert src.read_bytes() == before
    copy = onnx.load(str(dst))
    assert numpy_helper.to_array(copy.graph.initializer[0]).dtype == np.float16
    assert copy.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # IO spec kept


def test_trt11_fp16_folder_builds_from_its_own_graphs(fake_build, monkeypatch):
    monkeypatch.setattr("finers_rt.export.quantize.to_fp16", lambda *a: pytest.fail("no conversion needed"))
    trt, folder, _ = fake_build("11.4.0.106", precision="fp16", folder_precision="fp16")
    assert [c[1] for c in trt.calls if c[0] == "parse_from_file"] == [str(folder / rel) for rel in TRT_GRAPHS]


@pytest.mark.parametrize("version,kw,error,match", [
    ("11.4.0.106", {"precision": "bf16"}, ValueError, "strongly typed"),
    ("10.16.1.11", {"precision": "fp16", "max_batch": 2}, ValueError, "has a dynamic batch dim"),
    ("9.3.0", {"precision": "fp16"}, RuntimeError, "TensorRT 9.x is not supported"),
])
def test_builder_refuses_what_cannot_work(fake_build, version, kw, error, match):
    with pytest.raises(error, match=match):
        fake_build(version, **kw)


def test_fp8_needs_ada_or_hopper(fake_build, monkeypatch):
    monkeypatch.setattr(trt_build, "device_info", lambda: {"gpu": "NVIDIA A100-SXM4-80GB", "sm": "8.0"})
    with pytest.raises(ValueError, match=r"SM >= 8.9"):
        fake_build("10.16.1.11", precision="fp8")


def test_manifest_records_the_build(fake_build, capsys):
    _, folder, section = fake_build("10.16.1.11", precision="fp16")
    trt_build.cmd_build(SimpleNamespace(engines=folder, precision="fp16", max_batch=1, workspace_gb=4.0))
    out = capsys.readouterr().out
    assert "built 4 TensorRT 10.16.1.11 engines (fp16) for NVIDIA H100 80GB HBM3 (SM 9.0)" in out
    assert "gse/vision.engine" in out and "sam2/sam2_decoder.engine" in out
    saved = json.loads((folder / MANIFEST).read_text())["trt"]
    assert saved == json.loads(json.dumps(section))
    assert (saved["tensorrt"], saved["gpu"], saved["sm"], saved["precision"]) == ("10.16.1.11", *H100.values(), "fp16")
    assert saved["engines"]["gse/vision.onnx"]["file"] == "gse/vision.engine"
    assert saved["engines"]["gse/vision.onnx"]["profile"]["pixel_values"][1] == [10764, 1176]


def test_missing_tensorrt_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install 'finers-rt\[gpu\]' on a machine with an NVIDIA GPU"):
        trt_build.build_engines(_engine_folder(tmp_path))


@pytest.mark.parametrize("key", ["vision_attention", "sam2_attention"])
def test_folder_exported_with_ort_attention_is_refused(monkeypatch, tmp_path, key):
    monkeypatch.setattr(trt_build, "device_info", lambda: dict(H100))
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_builder_trt("10.16.1.11"))
    folder = _engine_folder(tmp_path / "eng")
    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, {**manifest, key: "ort"})
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ValueError, match=flag + r" ort .*finers-rt export --checkpoints /ckpt --out DIR --device cuda"):
        trt_build.build_engines(folder)


def test_build_subcommand_registers_with_its_func():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    trt_build.add_build_parser(sub)
    args = sub.choices["build"].parse_args(["--engines", "E", "--target", "trt", "--precision", "bf16",
                                            "--max-batch", "1", "--workspace-gb", "8"])
    assert (args.func, args.precision, args.workspace_gb) == (trt_build.cmd_build, "bf16", 8.0)
    with pytest.raises(SystemExit):
        sub.choices["build"].parse_args(["--engines", "E", "--target", "trt", "--precision", "int4"])


# ---- manifest compatibility ---------------------------------------------------------------------


@pytest.fixture
def built(fake_build):
    _, folder, _ = fake_build("10.16.1.11", precision="fp16")
    return folder, json.loads((folder / MANIFEST).read_text())


def test_engines_load_on_the_same_tensorrt_and_sm(built):
    folder, manifest = built
    assert check_trt_section(manifest, folder, tensorrt_version="10.16.1.11", sm="9.0") is manifest["trt"]


@pytest.mark.parametrize("change,match", [
    ({"tensorrt_version": "10.15.1.29"}, "built with TensorRT 10.16.1.11, this machine has 10.15.1.29"),
    ({"sm": "8.0"}, r"built for SM 9.0 \(NVIDIA H100 80GB HBM3\), this GPU is SM 8.0"),
])
def test_other_tensorrt_or_sm_is_stale_with_the_rebuild_command(built, change, match):
    folder, manifest = built
    kw = {"tensorrt_version": "10.16.1.11", "sm": "9.0", **change}
    with pytest.raises(StaleEngineError, match=match) as e:
        check_trt_section(manifest, folder, **kw)
    assert e.match(REBUILD)


def test_missing_engine_or_section_is_stale(built):
    folder, manifest = built
    (folder / "sam2/sam2_decoder.engine").unlink()
    with pytest.raises(StaleEngineError, match=f"sam2/sam2_decoder.onnx is missing. Rebuild: {REBUILD}"):
        check_trt_section(manifest, folder, tensorrt_version="10.16.1.11", sm="9.0")
    with pytest.raises(StaleEngineError, match=f"has no TensorRT engines. Build them on this machine: {REBUILD}"):
        check_trt_section({k: v for k, v in manifest.items() if k != "trt"}, folder,
                          tensorrt_version="10.16.1.11", sm="9.0")


def test_load_trt_refuses_engines_from_another_tensorrt(built, monkeypatch):
    from finers_rt.backends import trt as trt_backend

    folder, _ = built
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="11.4.0.106"))
    monkeypatch.setattr(trt_backend, "device_info", lambda: dict(H100))
    with pytest.raises(StaleEngineError, match=f"this machine has 11.4.0.106. Rebuild: {REBUILD}"):
        trt_backend.load_trt(folder)


# ---- ONNX Runtime TensorRT execution provider ---------------------------------------------------


def test_tensorrt_ep_options_cache_in_the_engine_folder_and_profiles_as_ort_expects(tmp_path):
    folder = _engine_folder(tmp_path)
    opts = tensorrt_options(folder / "gse" / "vision.onnx", "fp16")
    assert Path(opts["trt_engine_cache_path"]) == folder / "gse" / "trt_cache"
    assert Path(opts["trt_timing_cache_path"]).is_relative_to(folder)
    assert opts["trt_engine_cache_enable"] == opts["trt_timing_cache_enable"] == opts["trt_fp16_enable"] == "True"
    assert opts["trt_profile_min_shapes"] == ("pixel_values:1296x1176,pos_ids:1296x2,win_gather:25x64,"
                                              "win_mask:25x64,win_scatter:1296")
    assert opts["trt_profile_opt_shapes"] == ("pixel_values:10764x1176,pos_ids:10764x2,win_gather:180x64,"
                                              "win_mask:180x64,win_scatter:10764")
    assert opts["trt_profile_max_shapes"] == opts["trt_profile_opt_shapes"]  # GSE runs at the spec's max
    lpr = tensorrt_options(folder / "lpr" / "vision.onnx", "fp32")
    assert lpr["trt_profile_opt_shapes"].startswith("pixel_values:1296x1176,") and lpr["trt_fp16_enable"] == "False"
    assert "trt_profile_min_shapes" not in tensorrt_options(folder / "sam2" / "sam2_encoder.onnx", "fp32")
    dec = tensorrt_options(folder / "gse" / "decoder.onnx", "fp32")  # every dynamic input, past from 0
    assert "past_key_0:1x2x0x16" in dec["trt_profile_min_shapes"].split(",")
    assert len(dec["trt_profile_max_shapes"].split(",")) == 3 + 2 * 2


def test_tensorrt_device_resolves_per_graph_and_cpu_cuda_unchanged(tmp_path):
    folder = _engine_folder(tmp_path)
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    assert providers_for("cuda", "fp16") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = providers_for("tensorrt", "fp16")
    assert providers[0] == TensorrtEP("fp16") and providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    name, opts = resolve_providers(providers, folder / "sam2" / "sam2_decoder.onnx")[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_engine_cache_prefix"] == "sam2_decoder"
    assert opts["trt_profile_opt_shapes"] == "point_coords:1x4x2,point_labels:1x4"


# ---- the `trt` graph backend --------------------------------------------------------------------

TOY = GraphSpec(name="toy", inputs=(TensorSpec("x", "float32", ("n", 4)),),
                outputs=(TensorSpec("y", "float32", ("n", 4)),), profiles={"n": (1, 2, 8)})


def _host_view(addr: int, shape: tuple, dtype) -> np.ndarray:
    """A numpy view of `shape` at a fake device address (host memory here)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * max(n, 1)).from_address(addr), dtype, int(np.prod(shape))).reshape(shape)


class FakeEngine:
    """An engine declaring `spec`'s IO (dynamic dims -1, profile = the spec's) that computes
    `fn(inputs) -> outputs` on the buffers bound to it; `io` overrides what it declares."""

    def __init__(self, spec: GraphSpec, fn, **io):
        self.spec, self.fn, self.profile = spec, fn, profile_shapes(spec)
        dims = {t.name: tuple(-1 if isinstance(d, str) else d for d in t.shape) for t in (*spec.inputs, *spec.outputs)}
        self.io = {t.name: ("INPUT" if t in spec.inputs else "OUTPUT", t.dtype, dims[t.name])
                   for t in (*spec.inputs, *spec.outputs)}
        self.io.update(io)
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_shape(self, name):
        return self.io[name][2]

    def get_tensor_profile_shape(self, name, index):
        return list(self.profile[name])

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addr, self.out = engine, {}, {}, None

    def set_input_shape(self, name, shape):
        self.shapes[name], self.out = tuple(shape), None
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def get_tensor_shape(self, name):  # outputs: computed from the inputs already on the "device"
        if self.out is None:
            spec = self.engine.spec
            self.out = self.engine.fn({t.name: _host_view(self.addr[t.name], self.shapes[t.name], t.dtype).copy()
                                       for t in spec.inputs})
        return self.out[name].shape

    def execute_async_v3(self, stream):
        for name, value in self.out.items():
            _host_view(self.addr[name], value.shape, value.dtype)[...] = value
        return True


def _toy_engine(**io) -> FakeEngine:
    return FakeEngine(TOY, lambda d: {"y": 2 * d["x"]}, **io)


def _fake_runtime(monkeypatch, *engines: FakeEngine):
    """Inject a runtime `tensorrt` (engine file bytes b"0", b"1", ... -> engines[i]) and a
    cuda-python runtime whose device memory is host memory."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.16.1.11"
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dt: np.dtype(dt).type
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engines[int(data)])
    cudart, memory = types.ModuleType("cuda.bindings.runtime"), {}
    cudart.cudaError_t = SimpleNamespace(cudaSuccess=0)
    cudart.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def malloc(n):
        buf = ctypes.create_string_buffer(n)
        memory[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def free(ptr):
        del memory[ptr]
        return (0,)

    def memcpy(dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)

    cudart.cudaMalloc, cudart.cudaFree, cudart.cudaMemcpyAsync = malloc, free, memcpy
    cudart.cudaStreamCreate = lambda: (0, 7)
    cudart.cudaStreamSynchronize = cudart.cudaStreamDestroy = lambda stream: (0,)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return memory


def test_trt_graph_binds_by_name_and_runs_through_device_buffers(monkeypatch, tmp_path):
    from finers_rt.backends.trt_runtime import TrtGraph

    memory = _fake_runtime(monkeypatch, _toy_engine())
    (tmp_path / "toy.engine").write_bytes(b"0")
    graph = TrtGraph(tmp_path / "toy.engine", TOY)
    assert graph.limits == {"x": ((1, 4), (8, 4))}
    for n in (3, 8, 2):  # buffers grow once, then are reused
        x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
        np.testing.assert_array_equal(graph.run({"x": x})["y"], 2 * x)
    assert len(memory) == 2
    with pytest.raises(ValueError, match=r"input x dim 0 \(n\) = 9 is above the engine profile's max 8"):
        graph.run({"x": np.zeros((9, 4), np.float32)})
    with pytest.raises(ValueError, match=r"dim 1 = 5 is above the engine profile's max 4"):
        graph.run({"x": np.zeros((2, 5), np.float32)})
    with pytest.raises(TypeError, match="x is float64, the engine takes float32"):
        graph.run({"x": np.zeros((2, 4))})
    graph.close()
    assert not memory


@pytest.mark.parametrize("io,match", [
    ({"z": ("OUTPUT", "float32", (-1, 4))}, r"engine has IO \['x', 'y', 'z'\]"),
    ({"x": ("INPUT", "float16", (-1, 4))}, "x is float16, specs.toy says float32"),
    ({"y": ("INPUT", "float32", (-1, 4))}, "y should be an output"),
    ({"x": ("INPUT", "float32", (-1, 3))}, r"x has shape \(-1, 3\), spec \('n', 4\)"),
])
def test_trt_graph_refuses_an_engine_that_does_not_match_the_spec(monkeypatch, tmp_path, io, match):
    from finers_rt.backends.trt_runtime import TrtGraph

    _fake_runtime(monkeypatch, _toy_engine(**io))
    (tmp_path / "toy.engine").write_bytes(b"0")
    with pytest.raises(ValueError, match=match):
        TrtGraph(tmp_path / "toy.engine", TOY, rebuild="rebuild: finers-rt build ...")


def test_trt_vision_and_sam2_runners_reuse_the_ort_host_processing(monkeypatch, tmp_path):
    from finers_rt import sam2_host
    from finers_rt.backends.trt import TrtSAM2, TrtVision

    def vision(d):  # one token per 2x2 merge unit, in window order
        return {"image_embeds": d["pixel_values"].reshape(-1, 4, 1176)[:, :, :8].mean(axis=1)}

    def encoder(d):
        m = np.float32(d["image"].mean())
        return {t.name: np.full(t.shape, m, np.float32) for t in SAM2_ENCODER.outputs}

    def decoder(d):  # logits > 0 left of the first point's x, per mask k: shifted by k * 64
        x = np.arange(256, dtype=np.float32)[None, None, None, :] * 4
        k = np.arange(3, dtype=np.float32)[None, :, None, None] * 64
        masks = np.broadcast_to(d["point_coords"][0, 0, 0] - x - k, (1, 3, 256, 256)).astype(np.float32)
        return {"masks": masks, "iou_predictions": np.array([[0.1, 0.9, 0.5]], np.float32)}

    _fake_runtime(monkeypatch, FakeEngine(VISION, vision), FakeEngine(SAM2_ENCODER, encoder),
                  FakeEngine(SAM2_DECODER, decoder))
    for i in range(3):
        (tmp_path / f"{i}.engine").write_bytes(str(i).encode())
    cfg = VisionPreprocessConfig(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                 merge_size=2, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, window_size=112)
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    feeds, reverse, _ = vision_inputs(image, cfg)
    got = TrtVision(tmp_path / "0.engine", cfg).run(image)
    np.testing.assert_array_equal(got, vision(feeds)["image_embeds"][reverse])  # raster order restored

    sam2 = TrtSAM2(tmp_path / "1.engine", tmp_path / "2.engine")
    crop = image[:300, :200]
    sam2.set_image(crop)
    masks, scores = sam2.predict(np.array([50, 60, 150, 200], np.float32), None, None)
    coords, _ = sam2_host.prompt_inputs(np.array([50, 60, 150, 200], np.float32), None, None, (300, 200))
    want = decoder({"point_coords": coords})["masks"][0]
    np.testing.assert_array_equal(masks, sam2_host.masks_from_logits(want, (300, 200)))
    assert masks.shape == (3, 300, 200) and masks[0].any() and list(scores) == pytest.approx([0.1, 0.9, 0.5])
    assert sam2.features["image_embed"].shape == (1, 256, 64, 64)


def test_device_info_without_a_gpu_is_a_clear_error():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from finers_rt.backends.trt_runtime import device_info

    try:
        info = device_info()
    except RuntimeError as e:
        assert "cudaGetDeviceCount" in str(e)
    else:  # a GPU machine
        assert info["sm"].count(".") == 1 and info["gpu"]


# ---- GPU: real engines on the tiny engine folder ------------------------------------------------

FP16_ATOL_SCALE = 100  # fp16 rounds at 2^-11 relative (fp32: 2^-24) and the tower accumulates it
# over every block; 100x the fp32 atol (1e-2 on outputs ~0.2) admits that, a wrong graph is off by >0.1.
MIN_SAM2_IOU = 0.99


def _need_gpu():
    try:
        trt = __import__("tensorrt")
    except ImportError:
        pytest.skip("TensorRT is not installed (pip install 'finers-rt[gpu]' on a machine with an NVIDIA GPU)")
    from finers_rt.backends.trt_runtime import device_info

    try:
        return trt, device_info()
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"no usable NVIDIA GPU: {e}")


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def gpu_engines(request, tmp_path_factory):
    _need_gpu()  # before the tiny checkpoints (~minutes on a CPU) are made
    folder = tmp_path_factory.mktemp(f"trt_{request.param}") / "engines"
    shutil.copytree(request.getfixturevalue("tiny_engines"), folder)
    trt_build.build_engines(folder, precision=request.param)
    return folder, request.param


def _image(seed, w, h):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.gpu
@pytest.mark.parametrize("stage,size", [("gse", (1920, 1080)), ("lpr", (512, 512))])
def test_gpu_vision_engine_matches_ort_cpu(gpu_engines, stage, size):
    from finers_rt.backends.ort_vision import OrtVision
    from finers_rt.backends.trt import TrtVision

    folder, precision = gpu_engines
    ref = OrtVision(folder / stage / "vision.onnx")
    got = TrtVision(folder / stage / "vision.engine", ref.config)
    atol = VISION.atol * (FP16_ATOL_SCALE if precision == "fp16" else 1)
    for seed in range(2):
        a, b = ref.run(_image(seed, *size)), got.run(_image(seed, *size))
        assert a.shape == b.shape and np.abs(a - b).max() <= atol, f"{stage} {precision}: {np.abs(a - b).max()}"
    with pytest.raises(ValueError, match="below the engine profile's min 1296"):
        got.run(_image(0, 300, 100))  # 100x300 is under the spec's smallest vision input


@pytest.mark.gpu
def test_gpu_sam2_engines_masks_match_ort_cpu(gpu_engines):
    from finers_rt.backends.ort_sam2 import OrtSAM2
    from finers_rt.backends.trt import TrtSAM2

    folder, _ = gpu_engines
    ref, got = OrtSAM2(folder / "sam2"), TrtSAM2(folder / "sam2/sam2_encoder.engine", folder / "sam2/sam2_decoder.engine")
    for seed, (h, w) in enumerate([(512, 512), (375, 335), (1300, 900)]):
        crop = _image(seed, w, h)
        box = np.array([0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h], np.float32)
        points, labels = np.array([[0.5 * w, 0.5 * h], [0.55 * w, 0.45 * h]], np.float32), np.ones(2, np.int32)
        ref.set_image(crop)
        got.set_image(crop)
        (ma, _), (mb, _) = ref.predict(box, points, labels), got.predict(box, points, labels)
        for a, b in zip(ma, mb):
            union = np.logical_or(a, b).sum()
            assert union == 0 or np.logical_and(a, b).sum() / union >= MIN_SAM2_IOU


@pytest.mark.gpu
def test_gpu_load_trt_runs_a_stage(gpu_engines):
    import onnxruntime as ort

    from finers_rt.backends.trt import load_trt

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("the decoders stay on ONNX Runtime CUDA: onnxruntime-gpu is not installed")
    folder, _ = gpu_engines
    _, lpr, _, manifest = load_trt(folder)
    gen = lpr.generate(_image(0, 512, 512), "Please find 'the car'.", max_new_tokens=4)
    assert 1 <= len(gen.token_ids) <= 4 and gen.timings_ms["vision"] > 0 and manifest["trt"]["engines"]


@pytest.mark.gpu
def test_gpu_tensorrt_ep_vision_matches_cpu(request, tmp_path):
    import onnxruntime as ort

    from finers_rt.backends.ort_vision import OrtVision

    _need_gpu()
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with the TensorRT execution provider is not installed")
    folder = tmp_path / "engines"
    shutil.copytree(request.getfixturevalue("tiny_engines"), folder)
    ref = OrtVision(folder / "lpr" / "vision.onnx")
    got = OrtVision(folder / "lpr" / "vision.onnx", providers=providers_for("tensorrt", "fp32"))
    image = _image(1, 512, 512)
    assert np.abs(ref.run(image) - got.run(image)).max() <= VISION.atol * FP16_ATOL_SCALE  # TF32 allowed by the EP
    assert any((folder / "lpr" / "trt_cache").iterdir())
