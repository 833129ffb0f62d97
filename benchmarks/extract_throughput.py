"""Stage-one throughput: images/s of each backbone, model only and end to end into HDF5.

    python benchmarks/extract_throughput.py [--backbones efficientnet-lite0,vit-b16] [--batch 512]
                                            [--images 8192] [--e2e-seconds 60] [--workdir /tmp/featdp_throughput]

Model only: a device-resident uint8 batch through the jit-compiled, sharded forward (bf16 on GPU/TPU,
float32 on CPU), timed over repeated calls after compilation. End to end: `featdp.extraction.extract.extract` over
a folder of 256×256 JPEGs (read, decode, crop/resize in loader processes, forward, write float16
HDF5), as many images as the model alone would take about --e2e-seconds on (at most --images).
ViTs run with random weights (throughput does not depend on them; no checkpoint ships offline). When
torch and timm are importable and a GPU is present, the same run also times timm's ViT-B/16 under
`torch.compile` in bf16 at the same batch size.

Targets (issue 3, on one H100): Flax ViT-B/16 bf16 ≥ 1.15 × timm compiled (timm ≈ 10.5k img/s at
batch 512); end to end ≥ 90% of model only. Results go to benchmarks/results/extract_throughput_<device>.md.

Side by side (what benchmarks/gpu_check.sh runs; one framework per process, so JAX's and torch's GPU
memory pools never meet):

    python benchmarks/extract_throughput.py --side-by-side flax --models vit-b16,clip-vit-l14,dinov2-vit-b14 \
        [--batch 512] [--steps 10] [--quick] --json flax.json
    python benchmarks/extract_throughput.py --side-by-side timm ... --json timm.json
    python benchmarks/extract_throughput.py --table flax.json timm.json

Flax: featdp's runner path (`featdp.extraction.extract.ShardedForward`, or the same steps where featdp.extraction.extract
cannot be imported, e.g. without grain: weights cast as `cast_weights` does, one jit of
`apply(variables, uint8 batch).astype(float32)`), random weights, bf16 on a GPU. timm: the same
architecture under `torch.compile`, bf16 weights, the same uint8 NHWC batch normalised inside the
compiled function. Each: one compiling call, one warm-up call, then --steps timed calls on a
device-resident batch. Only featdp.extraction.backbones is imported on the Flax side (jax, flax, numpy).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from featdp.extraction.backbones.registry import Backbone, backbone_specs, load_backbone


def random_vit(name: str, depth: int | None = None) -> Backbone:
    """Any ViT-family backbone (vit-*, clip-*, siglip-*, dinov2-*) with random weights."""
    from featdp.extraction.backbones import clip, dinov2, siglip, vit  # noqa: F401  (each registers its configs)

    return vit.random_backbone(name, depth=depth)


def random_efficientnet(name: str) -> Backbone:
    import functools

    from featdp.extraction.backbones import efficientnet_lite as enet
    from featdp.extraction.backbones.pil_preprocessing import center_crop_resize

    config = enet.get_config(name.removeprefix("efficientnet-"))
    size = config.resolution
    model = enet.EfficientNetLite(config)
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))

    def apply(v, images):
        x = enet.normalize(jnp.asarray(images, jnp.float32) / 255.0, enet.MEAN_RGB, enet.STDDEV_RGB)
        return model.apply(v, x.astype(enet.compute_dtype(v)))

    return Backbone(name, enet.FEATURE_DIM, size, variables, apply,
                    functools.partial(center_crop_resize, size=size, crop_fraction=size / (size + 32)),
                    "random", "", {"weights": "random (throughput only)"})


def get_backbone(name: str) -> Backbone:
    if name.startswith(("vit-", "clip-", "siglip-", "dinov2-")):
        return random_vit(name)
    try:
        return load_backbone(name)
    except Exception as error:  # e.g. the weight packages are not installed on this machine
        if name.startswith("efficientnet-"):
            print(f"{name}: {error}; timing random weights instead", file=sys.stderr)
            return random_efficientnet(name)
        raise


def model_only(backbone: Backbone, batch: int, dtype, seconds: float = 10.0) -> tuple[float, int]:
    from featdp.extraction.extract import ShardedForward

    forward = ShardedForward(backbone, batch, dtype)
    images = np.random.default_rng(0).integers(0, 256, (forward.batch_size, backbone.image_size,
                                                        backbone.image_size, 3), dtype=np.uint8)
    images = jax.device_put(images, forward._batch_sharding)
    forward(images).block_until_ready()  # compile
    rates = []
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while True:
            out = forward(images)
            calls += 1
            if calls % 4 == 0:
                out.block_until_ready()
                if time.perf_counter() - start > seconds / 5:
                    break
        rates.append(calls * forward.batch_size / (time.perf_counter() - start))
    return statistics.median(rates), forward.batch_size


def make_jpeg_folder(root: pathlib.Path, count: int) -> pathlib.Path:
    from PIL import Image

    folder = root / "train" / "noise"
    if folder.exists() and len(list(folder.iterdir())) >= count:
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        # Smooth random images: JPEG sizes like photos (~20 kB), unlike white noise.
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((256, 256), Image.Resampling.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def end_to_end(backbone: Backbone, batch: int, folder: pathlib.Path, out: pathlib.Path,
               workers: int, images: int) -> tuple[float, float]:
    """(whole run incl. starting the loader processes, steady state from the first written batch) img/s."""
    from featdp.extraction.extract import ExtractConfig, extract

    config = ExtractConfig(dataset=f"folder:{folder}", out=out, batch_size=batch, overwrite=True, workers=workers,
                           limit=images)
    extract(dataclass_replace(config, limit=batch), backbone=backbone)  # compile + warm the page cache
    marks: list[tuple[float, int]] = []
    start = time.perf_counter()
    extract(config, backbone=backbone, on_progress=lambda p: marks.append((time.perf_counter(), p.rows_done)))
    whole = marks[-1][1] / (time.perf_counter() - start)
    written = [m for m in marks if m[1] > 0]
    (t0, r0), (t1, r1) = written[0], written[-1]
    return whole, (r1 - r0) / max(t1 - t0, 1e-9)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def timm_compiled(batch: int, seconds: float = 10.0) -> float | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import timm
    except Exception as error:  # e.g. a torchvision built for another torch breaks timm's import
        print(f"timm not usable here: {error}", file=sys.stderr)
        return None
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).cuda().eval()
    model = torch.compile(model.to(torch.bfloat16))
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        rates = []
        for _ in range(5):
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 5:
                model(x)
                calls += 1
                if calls % 4 == 0:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            rates.append(calls * batch / (time.perf_counter() - start))
    return statistics.median(rates)


# ----------------------------------------------------------------------------------------------------
# Side by side: Flax (featdp's runner) vs timm under torch.compile, one framework per process

# featdp backbone -> (timm model, its keyword arguments): the same architecture and pooled feature
# (DINOv2: featdp's default feature is class token ‖ mean patch token, timm's the class token; the
# extra mean is negligible work).
SIDE_BY_SIDE = {
    "vit-b16": ("vit_base_patch16_224", {}),
    "clip-vit-b16": ("vit_base_patch16_clip_quickgelu_224", {}),
    "clip-vit-l14": ("vit_large_patch14_clip_quickgelu_224", {}),
    "siglip-vit-b16": ("vit_base_patch16_siglip_224", {"act_layer": "gelu_tanh"}),
    "dinov2-vit-b14": ("vit_base_patch14_dinov2", {"img_size": 224}),
    "dinov2-vit-l14": ("vit_large_patch14_dinov2", {"img_size": 224}),
}


def _write_json(path: pathlib.Path | None, payload: dict) -> None:
    if path is not None:  # rewritten after every model: a run cut short keeps what it measured
        path.write_text(json.dumps(payload, indent=1))


def _flax_runner(backbone: Backbone, batch: int, dtype):
    """(forward, put, which): featdp.extraction.extract.ShardedForward where it imports, else the same steps."""
    try:
        from featdp.extraction.extract import ShardedForward
    except ImportError as error:
        def cast(leaf):  # featdp.extraction.extract.cast_weights: floating tensors of ndim ≥ 2 to the compute dtype
            floating = jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2
            return leaf.astype(dtype) if floating else leaf

        variables = jax.device_put(jax.tree_util.tree_map(lambda a: cast(jnp.asarray(a)), backbone.variables))
        compiled = jax.jit(lambda v, x: backbone.apply(v, x).astype(jnp.float32))
        return (lambda images: compiled(variables, images), jax.device_put,
                f"replica of ShardedForward (featdp.extraction.extract not importable: {error})")
    forward = ShardedForward(backbone, batch, dtype)
    return forward, (lambda x: jax.device_put(x, forward._batch_sharding)), "featdp.extraction.extract.ShardedForward"


def side_by_side_flax(names: list[str], batch: int, steps: int, depth: int | None, json_path, xla_too: set[str]):
    from featdp.extraction.backbones import vit

    dtype = jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    payload = {"framework": "flax", "device": jax.local_devices()[0].device_kind, "jax": jax.__version__,
               "dtype": jnp.dtype(dtype).name, "batch": batch, "steps": steps, "rows": []}
    for name in names:
        for attention in ([None, "xla"] if name in xla_too else [None]):
            if attention:
                os.environ["FEATDP_ATTENTION"] = attention
            else:
                os.environ.pop("FEATDP_ATTENTION", None)
            backbone = random_vit(name, depth=depth)
            config = vit.get_config(name)
            chosen = vit.attention_implementation(dtype, config.head_dim)
            row = {"model": name, "attention": chosen + (" (forced)" if attention else ""),
                   "depth": depth or config.depth}
            try:
                forward, put, row["runner"] = _flax_runner(backbone, batch, dtype)
                images = put(np.random.default_rng(0).integers(
                    0, 256, (batch, backbone.image_size, backbone.image_size, 3), dtype=np.uint8))
                start = time.perf_counter()
                out = forward(images).block_until_ready()
                row["compile_s"] = time.perf_counter() - start
                forward(images).block_until_ready()
                start = time.perf_counter()
                outs = [forward(images) for _ in range(steps)]
                jax.block_until_ready(outs)
                seconds = time.perf_counter() - start
                row.update(images_per_s=steps * batch / seconds, finite=bool(np.isfinite(np.asarray(out)).all()),
                           feature_shape=list(out.shape))
            except Exception as error:  # noqa: BLE001 (reported in the table, the other models still run)
                row["error"] = f"{type(error).__name__}: {error}"[:400]
            payload["rows"].append(row)
            _write_json(json_path, payload)
            print(json.dumps(row), flush=True)
    os.environ.pop("FEATDP_ATTENTION", None)
    return payload


def _import_timm():
    import torch

    try:
        import timm
    except RuntimeError as err:  # a CUDA torchvision next to a CPU torch: declare its two ops (tests do too)
        if "torchvision::" not in str(err):
            raise
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _import_timm.keep = lib
        import timm
    return torch, timm


def side_by_side_timm(names: list[str], batch: int, steps: int, depth: int | None, json_path, compile_: bool):
    torch, timm = _import_timm()
    from featdp.extraction.backbones import clip, dinov2, siglip, vit  # noqa: F401  (each registers its configs)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    payload = {"framework": "timm", "device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "timm": timm.__version__, "dtype": "bfloat16", "batch": batch,
               "steps": steps, "rows": []}
    for name in names:
        timm_name, kwargs = SIDE_BY_SIDE[name]
        config = vit.get_config(name)
        row = {"model": name, "timm_model": timm_name, "depth": depth or config.depth}
        try:
            model = timm.create_model(timm_name, pretrained=False, num_classes=0,
                                      **dict(kwargs, **({"depth": depth} if depth else {})))
            model = model.eval().to(device=device, dtype=torch.bfloat16)
            mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
            std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)

            def forward(x, model=model, mean=mean, std=std):
                x = x.permute(0, 3, 1, 2).float().div(255.0)
                return model(((x - mean) / std).to(torch.bfloat16)).float()

            size = config.image_size
            images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
            row["mode"] = "torch.compile" if compile_ else "eager"
            run = torch.compile(forward) if compile_ else forward
            with torch.inference_mode():
                start = time.perf_counter()
                try:
                    out = run(images)
                except Exception as error:  # noqa: BLE001 (no compiler here: measure eager, say so)
                    row["mode"] = f"eager (torch.compile failed: {type(error).__name__}: {str(error)[:200]})"
                    run = forward
                    out = run(images)
                sync()
                row["compile_s"] = time.perf_counter() - start
                run(images)
                sync()
                start = time.perf_counter()
                for _ in range(steps):
                    out = run(images)
                sync()
                seconds = time.perf_counter() - start
            row.update(images_per_s=steps * batch / seconds, finite=bool(torch.isfinite(out).all()),
                       feature_shape=list(out.shape))
            del model, run
            if cuda:
                torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"[:400]
        payload["rows"].append(row)
        _write_json(json_path, payload)
        print(json.dumps(row), flush=True)
    return payload


def side_by_side_table(flax_path: pathlib.Path, timm_path: pathlib.Path) -> str:
    def load(path):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            return {"rows": [], "missing": f"{path}: {error}"}

    flax, timm = load(flax_path), load(timm_path)
    timm_rows = {r["model"]: r for r in timm.get("rows", [])}

    def rate(row):
        if row is None:
            return "not measured (timed out or not run)"
        if "error" in row:
            return f"error: {row['error'][:120]}"
        return f"{row['images_per_s']:,.0f}"

    lines = [f"# gpu_check: Flax (featdp runner) vs timm, random weights, batch {flax.get('batch', timm.get('batch'))}",
             "",
             f"Flax: {flax.get('device', '?')}, jax {flax.get('jax', '?')}, compute {flax.get('dtype', '?')}; "
             f"timm: {timm.get('device', '?')}, torch {timm.get('torch', '?')}, timm {timm.get('timm', '?')}, "
             f"bf16; {flax.get('steps', '?')} timed batches after a compiling and a warm-up call.", ""]
    for payload in (flax, timm):
        if payload.get("missing"):
            lines += [f"missing: {payload['missing']}", ""]
    lines += ["| model | Flax img/s | Flax attention | Flax compile s | timm img/s | timm mode | timm compile s "
              "| Flax / timm |", "|---|---|---|---|---|---|---|---|"]
    for row in flax.get("rows", []) or [{"model": m} for m in timm_rows]:
        other = timm_rows.get(row["model"])
        if row.get("attention", "").endswith("(forced)"):
            other = None  # an extra Flax variant: its timm row is the one above
        ratio = ("-" if other is None or "images_per_s" not in other or "images_per_s" not in row
                 else f"{row['images_per_s'] / other['images_per_s']:.2f}")
        depth = f" (depth {row['depth']})" if row.get("depth") and row.get("quick") else ""
        lines.append("| " + " | ".join([
            row["model"] + depth, rate(row) if "attention" in row else "not measured", row.get("attention", "-"),
            f"{row['compile_s']:.0f}" if "compile_s" in row else "-",
            rate(other) if other is not None or not row.get("attention", "").endswith("(forced)") else "-",
            (other or {}).get("mode", "-")[:60], f"{other['compile_s']:.0f}" if other and "compile_s" in other else "-",
            ratio]) + " |")
    runners = sorted({r.get("runner", "") for r in flax.get("rows", []) if r.get("runner")})
    if runners:
        lines += ["", "Flax runner: " + "; ".join(runners)]
    return "\n".join(lines) + "\n"


def side_by_side_main(args) -> None:
    names = args.models.split(",")
    unknown = [n for n in names if n not in SIDE_BY_SIDE]
    if unknown:
        raise SystemExit(f"--models: no timm counterpart for {unknown}; choose from {sorted(SIDE_BY_SIDE)}")
    depth = 2 if args.quick else None
    if args.side_by_side == "flax":
        payload = side_by_side_flax(names, args.batch, args.steps, depth, args.json,
                                    xla_too=set(args.xla_attention_too.split(",")) - {""})
    else:
        payload = side_by_side_timm(names, args.batch, args.steps, depth, args.json, compile_=not args.eager)
    if args.quick:
        for row in payload["rows"]:
            row["quick"] = True
        _write_json(args.json, payload)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side-by-side", choices=("flax", "timm"),
                        help="time --models in one framework (see the module docstring)")
    parser.add_argument("--models", default="vit-b16,clip-vit-l14,dinov2-vit-b14")
    parser.add_argument("--steps", type=int, default=10, help="timed batches per model (--side-by-side)")
    parser.add_argument("--json", type=pathlib.Path, help="--side-by-side results, rewritten after each model")
    parser.add_argument("--quick", action="store_true", help="--side-by-side with depth-2 models (smoke test)")
    parser.add_argument("--eager", action="store_true", help="--side-by-side timm without torch.compile")
    parser.add_argument("--xla-attention-too", default="vit-b16",
                        help="--side-by-side flax: also time these with FEATDP_ATTENTION=xla")
    parser.add_argument("--table", nargs=2, type=pathlib.Path, metavar=("FLAX_JSON", "TIMM_JSON"),
                        help="print the markdown table of two --side-by-side results")
    parser.add_argument("--backbones", default=None)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--images", type=int, default=8192, help="JPEGs in the folder: the most an e2e run reads")
    parser.add_argument("--e2e-seconds", type=float, default=60.0,
                        help="size each e2e run to about this long at model-only speed (at least 4 batches)")
    parser.add_argument("--workers", type=int, default=None, help="default: featdp.extraction.extract's")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/featdp_throughput"))
    args = parser.parse_args(argv)
    if args.table:
        print(side_by_side_table(*args.table), end="")
        return
    if args.side_by_side:
        side_by_side_main(args)
        return
    from featdp.extraction.extract import ExtractConfig, compute_dtype

    args.backbones = args.backbones or ",".join(backbone_specs())
    args.workers = ExtractConfig.workers if args.workers is None else args.workers
    dtype = compute_dtype("auto")
    device = f"{jax.local_device_count()}x {jax.local_devices()[0].device_kind}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = None if args.skip_e2e else make_jpeg_folder(args.workdir / "jpegs", args.images)
    rows = [f"# extract_throughput on {device}, compute {jnp.dtype(dtype).name}, batch {args.batch}", "",
            f"command: python benchmarks/extract_throughput.py {' '.join(sys.argv[1:])}", "",
            "| backbone | model only (img/s) | e2e images | end to end, whole run (img/s) "
            "| end to end, steady (img/s) | steady / model |",
            "|---|---|---|---|---|---|"]
    vit_b16 = None
    for name in args.backbones.split(","):
        backbone = get_backbone(name)
        model_rate, batch = model_only(backbone, args.batch, dtype, args.seconds)
        if name == "vit-b16":
            vit_b16 = model_rate
        # Slow models on small machines: enough images for a steady state, not hours of them.
        images = min(args.images, max(4 * batch, int(model_rate * args.e2e_seconds)))
        e2e = None if folder is None else end_to_end(backbone, batch, folder, args.workdir / "f.h5", args.workers,
                                                     images)
        cells = [name, f"{model_rate:,.0f}"] + (["-"] * 4 if e2e is None else [
            str(images), f"{e2e[0]:,.0f}", f"{e2e[1]:,.0f}", f"{e2e[1] / model_rate:.2f}"])
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    if vit_b16 is not None:
        timm_rate = timm_compiled(args.batch, args.seconds)
        if timm_rate is None:
            rows += ["", "timm torch.compile bf16 ViT-B/16: not measured (no torch/timm or no GPU here)"]
        else:
            rows += ["", f"timm vit_base_patch16_224, torch.compile, bf16, batch {args.batch}: {timm_rate:,.0f} img/s",
                     f"Flax ViT-B/16 / timm = {vit_b16 / timm_rate:.2f} (target ≥ 1.15)"]
    text = "\n".join(rows) + "\n"
    print(text)
    results = pathlib.Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    slug = jax.local_devices()[0].device_kind.replace(" ", "_").lower()
    (results / f"extract_throughput_{slug}.md").write_text(text)


if __name__ == "__main__":
    main()
