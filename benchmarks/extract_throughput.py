"""Stage-one throughput: images/s of each backbone, model only and end to end into HDF5.

    python benchmarks/extract_throughput.py [--backbones efficientnet-lite0,vit-b16] [--batch 512]
                                            [--images 8192] [--e2e-seconds 60] [--workdir /tmp/featdp_throughput]

Model only: a device-resident uint8 batch through the jit-compiled, sharded forward (bf16 on GPU/TPU,
float32 on CPU), timed over repeated calls after compilation. End to end: `featdp.extract.extract` over
a folder of 256×256 JPEGs (read, decode, crop/resize in loader processes, forward, write float16
HDF5), as many images as the model alone would take about --e2e-seconds on (at most --images).
ViTs run with random weights (throughput does not depend on them; no checkpoint ships offline). When
torch and timm are importable and a GPU is present, the same run also times timm's ViT-B/16 under
`torch.compile` in bf16 at the same batch size.

Targets (issue 3, on one H100): Flax ViT-B/16 bf16 ≥ 1.15 × timm compiled (timm ≈ 10.5k img/s at
batch 512); end to end ≥ 90% of model only. Results go to benchmarks/results/extract_throughput_<device>.md.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from featdp.backbones.registry import Backbone, backbone_specs, load_backbone
from featdp.extract import ExtractConfig, ShardedForward, compute_dtype, extract


def random_vit(name: str) -> Backbone:
    import functools

    from featdp.backbones import vit
    from featdp.backbones.pil_preprocessing import center_crop_resize

    config = vit.get_config(name)
    size = config.image_size
    variables = vit.ViT(config).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return Backbone(name, config.width, size, variables, vit.make_apply(config),
                    functools.partial(center_crop_resize, size=size, crop_fraction=vit.CROP_FRACTION),
                    "random", "", {"weights": "random (throughput only)"})


def random_efficientnet(name: str) -> Backbone:
    import functools

    from featdp.backbones import efficientnet_lite as enet
    from featdp.backbones.pil_preprocessing import center_crop_resize

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
    if name.startswith("vit-"):
        return random_vit(name)
    try:
        return load_backbone(name)
    except Exception as error:  # e.g. the weight packages are not installed on this machine
        if name.startswith("efficientnet-"):
            print(f"{name}: {error}; timing random weights instead", file=sys.stderr)
            return random_efficientnet(name)
        raise


def model_only(backbone: Backbone, batch: int, dtype, seconds: float = 10.0) -> tuple[float, int]:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default=",".join(backbone_specs()))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--images", type=int, default=8192, help="JPEGs in the folder: the most an e2e run reads")
    parser.add_argument("--e2e-seconds", type=float, default=60.0,
                        help="size each e2e run to about this long at model-only speed (at least 4 batches)")
    parser.add_argument("--workers", type=int, default=ExtractConfig.workers)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/featdp_throughput"))
    args = parser.parse_args(argv)
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
