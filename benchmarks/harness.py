"""The benchmarks' shared pieces: presets (``--preset gpu|cpu``, ``--quick``), the machine record, timing
(steady-state loaders, cProfile, CUDA syncs, RSS), synthetic images / manifests / caches, tables, atomic JSON
results and marked sections of the docs. What each preset holds: docs/benchmarks.md, section harness."""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from common.atomic import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]

RESULTS_DIR = REPO / "benchmarks" / "results"
IMAGENET_TRAIN_IMAGES = 1_281_167


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    name: str
    device: str  # runtime.device
    precision: str  # runtime.precision ("auto" = bf16 on CUDA, fp32 on CPU)
    teachers: tuple[str, ...]
    teacher_sizes: tuple[str, ...]  # "NAME=SIZE" overrides; () = each teacher's own default
    student: str
    student_size: int
    num_classes: int
    num_crops: int  # C of the stage 1 cache
    topk: int
    stage1_batch: int  # crops per teacher forward
    stage1_images: int
    images_per_shard: int
    stage2_batch: int
    stage2_images: int
    num_workers: int  # decode threads (torch loader) / DALI threads
    torch_threads: int = 0  # torch.set_num_threads (0 = torch's default)
    image_sizes: tuple[int, int] = (256, 500)  # shorter/longer side range of the generated JPEGs
    extra: dict = field(default_factory=dict)

    def runtime_keys(self, seed: int) -> dict[str, Any]:
        """The ``runtime.*`` config keys of a run under this preset, with no progress bar."""
        return {"runtime.device": self.device, "runtime.precision": self.precision, "runtime.progress": False,
                "runtime.num_workers": self.num_workers, "runtime.seed": seed}


PRESETS = {
    "gpu": Preset(
        name="gpu", device="auto", precision="auto",
        teachers=("senet154", "resnest269e"), teacher_sizes=(),  # 224 and 416 px, timm's defaults
        student="resnet50", student_size=224, num_classes=1000, num_crops=8, topk=10,
        stage1_batch=128, stage1_images=2048, images_per_shard=256,
        stage2_batch=256, stage2_images=10240, num_workers=max(2, (os.cpu_count() or 2) - 2),
    ),
    "cpu": Preset(
        name="cpu", device="cpu", precision="auto",
        teachers=("test_resnet", "test_convnext"), teacher_sizes=("test_resnet=64", "test_convnext=48"),
        student="test_efficientnet", student_size=64, num_classes=100, num_crops=4, topk=5,
        stage1_batch=64, stage1_images=384, images_per_shard=64,
        stage2_batch=32, stage2_images=480, num_workers=2,
        # One intra-op thread: on 2 cores shared with other jobs, 2 threads per op wait for the
        # slower one and run 2-4x slower than 1 (measured); the loader threads use the other core.
        torch_threads=1,
    ),
}


def names(text: str) -> list[str]:
    """An argparse ``type``: the items of a comma list ("a,b")."""
    return [item.strip() for item in text.split(",") if item.strip()]


def ints(text: str) -> list[int]:
    """An argparse ``type``: the integers of a comma list ("0,1")."""
    return [int(item) for item in names(text)]


def demo_parser(doc: str):
    """(a parser with --config and --source, the demo's config) for a benchmark on the demo's Fashion-MNIST data;
    the config's settings are the benchmark's defaults."""
    from stage2_student_distill.app.demo import demo_config

    cfg = demo_config()
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="pipeline.toml to start from (default: the repository's)")
    p.add_argument("--source", default=cfg.demo.source_dir, help="Fashion-MNIST idx files")
    return p, cfg


def perf_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a performance benchmark (``doc``: its module docstring), with the flags they all take."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="gpu: real teachers/student, bf16; cpu: tiny timm models (default: gpu if CUDA)")
    add_quick_arg(parser)
    parser.add_argument("--workdir", default=None, help="temp data here (default: a new temp dir, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the temp data")
    add_out_arg(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: the preset's; cpu: 1, gpu: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def add_quick_arg(parser: argparse.ArgumentParser, help: str = "smoke run (< 60 s)",
                  where: str = "JSON under benchmarks/results/quick/") -> None:
    """The one smoke-run flag of every benchmark (``--smoke`` is the same flag); each benchmark maps it to its
    own small sizes."""
    parser.add_argument("--quick", "--smoke", dest="quick", action="store_true",
                        help=f"{help}; {where}")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device, --loader and --num-workers of the benchmarks that train through the library."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    parser.add_argument("--loader", default="auto", help="stage 2 loader: auto | torch | dali")
    parser.add_argument("--num-workers", type=int, default=2)


def add_out_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="JSON result path (default: benchmarks/results/<name>.json, "
                        "--quick: benchmarks/results/quick/<name>.json)")


def resolve_preset(args: argparse.Namespace, **overrides: Any) -> Preset:
    """The preset named by ``--preset`` (or the default), with non-None ``overrides``; sets torch's threads."""
    import torch

    preset = PRESETS[args.preset or ("gpu" if torch.cuda.is_available() else "cpu")]
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    threads = args.threads if args.threads is not None else preset.torch_threads
    if threads:
        torch.set_num_threads(threads)
    return preset


def command_line() -> str:
    """How this benchmark was invoked, as a command that reruns it from the repository root."""
    module = os.path.relpath(sys.argv[0], REPO).removesuffix(".py").replace(os.sep, ".")
    return " ".join(["python -m", module, *sys.argv[1:]])


def module_command(module: str, *args: str) -> list[str]:
    """The argv that runs benchmark ``module`` (e.g. "benchmarks.bench_memory") in a child process;
    run it with ``cwd=REPO`` so that ``-m`` finds the package."""
    return [sys.executable, "-m", module, *args]


def child_args(args: argparse.Namespace, preset: Preset) -> list[str]:
    """The flags a performance benchmark passes on to its child processes: its preset, seed and --threads."""
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    return ["--preset", preset.name, "--seed", str(args.seed), *threads]


def run_child(cmd: Sequence[str], what: str, **kwargs: Any) -> tuple[Any, float, float]:
    """Runs ``cmd`` in the repository root, its output captured: (the finished process, its wall seconds, the
    1-minute load average before it). A failure prints the ends of its output and exits, naming ``what``."""
    import subprocess

    load = loadavg()[0]
    with Timer() as t:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, **kwargs)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"{what} failed ({proc.returncode})")
    return proc, t.seconds, load


def say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def figure(path: Path, figsize: tuple[float, float], dpi: int) -> Iterator[Any]:
    """The axes of a new matplotlib figure (no display needed), laid out and saved as ``path`` at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    yield ax
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def run_steps(keys: Sequence[str], step: Callable[[str], Any], module: str, argv: Sequence[str], jobs: int,
              workdir: Path) -> None:
    """Do the steps ``keys`` of a resumable study (unfinished, independent of one another; each records itself
    once finished): ``step(key)`` one after the other in this process with ``jobs`` <= 1, else ``jobs`` at a time,
    each in a child process ``python -m MODULE ARGV --step KEY`` logging to WORKDIR/logs/KEY.log. On a 2-core
    machine a training run uses one core and two runs use both. A child that fails leaves no record and the others
    finish; an interrupt (Ctrl-C, ``kill``) ends the children too, and the next invocation redoes them."""
    if jobs <= 1:
        return run_jobs(step, keys, 1)
    import signal
    import subprocess

    logs = Path(workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo, running, failed = list(keys), {}, []
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below runs on `kill` too
    try:
        while todo or running:
            while todo and len(running) < jobs:
                key = todo.pop(0)
                log = (logs / f"{key.replace(':', '_')}.log").open("a")
                cmd = module_command(module, *argv, "--step", key)
                running[key] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
                say(f"{key}: started (log: {log.name})")
            time.sleep(2)
            for key, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[key]
                    say(f"{key}: finished" if proc.returncode == 0 else
                        f"{key}: FAILED (exit {proc.returncode}); its log: {log.name}")
                    if proc.returncode:
                        failed.append(key)
    finally:
        for proc, log in running.values():
            proc.terminate()
            proc.wait()
            log.close()
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed (logs in {logs}); rerun the same command to resume")


def run_main(main: Callable[[], int]) -> None:
    """Exits with ``main()``'s code; bad input (a missing dataset, a refused teacher) ends in the library's one-line
    message, as the CLI prints it."""
    import click

    from common.cli_support import user_errors

    try:
        with user_errors():
            sys.exit(main())
    except click.ClickException as e:
        e.show()
        sys.exit(1)


# --------------------------------------------------------------------------- machine


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key:`` line of a /proc file (None where there is no /proc)."""
    try:
        return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                     if line.startswith(key)), None)
    except OSError:
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001 - absent or broken: recorded as None
        return None


def machine_info() -> dict[str, Any]:
    import torch

    ram_kib = _proc_field("/proc/meminfo", "MemTotal")
    info = {
        "nproc": os.cpu_count(),
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "ram_gib": round(int(ram_kib.split()[0]) / 2**20, 1) if ram_kib else None,
        "torch_threads": torch.get_num_threads(), "loadavg_at_start": loadavg(),
        "python": platform.python_version(), "torch": torch.__version__,
        **{key: _version(module) for key, module in (("timm", "timm"), ("dali", "nvidia.dali"), ("zarr", "zarr"),
                                                     ("numcodecs", "numcodecs"), ("numpy", "numpy"), ("pillow", "PIL"))},
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    return info


def announce(*lines: str) -> dict[str, Any]:
    """The machine record, printed before what this run will measure (``lines``)."""
    info = machine_info()
    for line in (machine_line(info), *lines):
        print(line, flush=True)
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM{gpu}; "
        f"python {info['python']}, torch {info['torch']}, timm {info['timm']}, DALI {info['dali']}, "
        f"zarr {info['zarr']}; torch threads {info['torch_threads']}; load average {info['loadavg_at_start']}"
    )


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def rss_bytes() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set of this process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


# --------------------------------------------------------------------------- workdir


@contextlib.contextmanager
def workdir(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """``--workdir`` (kept), else a new temp directory, deleted at the end unless ``--keep``."""
    path = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(path, ignore_errors=True)


def disk_usage(path: Path) -> dict[str, int]:
    """Apparent bytes (sum of st_size, like `du --apparent-size -s -B1`) and allocated bytes
    (sum of st_blocks * 512, like `du -s -B1`), directories included as du counts them.
    Small files are rounded up to the filesystem block (4 KiB here), so the two can differ a lot."""
    entries = [Path(path), *Path(path).rglob("*")]
    stats = [entry.lstat() for entry in entries]
    return {"apparent": sum(st.st_size for st in stats), "allocated": sum(st.st_blocks * 512 for st in stats),
            "files": sum(not entry.is_dir() for entry in entries)}


# --------------------------------------------------------------------------- synthetic images


def run_jobs(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, chunksize: int = 1) -> None:
    """``fn`` on every job: here with one worker, else in that many processes."""
    if workers <= 1:
        for job in jobs:
            fn(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(fn, jobs, chunksize=chunksize))


def _image_size(rng: np.random.Generator, sizes: tuple[int, int]) -> tuple[int, int]:
    lo, hi = sizes
    short = int(rng.integers(lo, min(hi, int(lo * 1.6)) + 1))
    long = int(min(hi, round(short * rng.uniform(1.0, 1.5))))
    return (long, short) if rng.random() < 0.75 else (short, long)  # mostly landscape, like ImageNet


def _write_one(job: tuple[str, int, int, int]) -> None:
    from PIL import Image

    path, w, h, seed = job
    rng = np.random.default_rng(seed)
    # Smooth colour fields (upsampled low-res noise) + fine grain: compresses and decodes
    # like a photo (~0.3-0.6 bit/pixel at q=90), unlike pure noise (incompressible) or flat colour.
    small = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-8, 9, size=(h, w, 1), dtype=np.int16)
    pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


def make_image_tree(root: Path, num_images: int, num_classes: int, sizes: tuple[int, int] = (256, 500),
                    seed: int = 0, workers: int | None = None) -> Path:
    """ImageFolder tree ``root/cNNNN/imgNNNNNN.jpg``: images dealt round-robin over the classes."""
    if num_images < num_classes:
        raise ValueError(f"{num_images} images cannot fill {num_classes} class folders")
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(num_images):
        folder = root / f"c{i % num_classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = _image_size(rng, sizes)
        jobs.append((str(folder / f"img{i:06d}.jpg"), w, h, seed * 1_000_003 + i))
    run_jobs(_write_one, jobs, workers or max(1, min(16, os.cpu_count() or 1)), chunksize=32)
    return root


def image_dataset(workdir: Path, name: str, num_images: int, num_classes: int, sizes=(256, 500), seed: int = 0):
    """Images + manifest (built with the project's ``build_manifest``); reused if already in ``workdir``."""
    from common.manifest import load_manifest
    from data_manifests.build import build_manifest

    root = workdir / f"{name}-images"
    manifest = workdir / f"{name}.parquet"
    if manifest.exists():
        return manifest, load_manifest(manifest)
    if root.exists():
        shutil.rmtree(root)
    make_image_tree(root, num_images, num_classes, sizes=sizes, seed=seed)
    return manifest, build_manifest(root, manifest, progress=False)


def subset_manifest(manifest, count: int, out: Path) -> Path:
    """The first ``count`` images of a loaded manifest, same root and classes (a warm-up set)."""
    from common.manifest import write_manifest
    from stage1_teacher_cache.sharing import subset_rows

    write_manifest(subset_rows(manifest, range(count)), manifest.class_names, manifest.root, out)
    return out


def synthetic_manifest(out: Path, num_images: int, num_classes: int, root: Path, width: int = 400,
                       height: int = 300):
    """A manifest of ``num_images`` fake rows (paths that need not exist) via ``write_manifest``.

    Returns a light description (path, content_hash, sizes, classes) usable by
    :func:`synthetic_cache` without loading the manifest back.
    """
    from types import SimpleNamespace

    from common.manifest import ManifestRow, write_manifest

    names = [f"c{c:04d}" for c in range(num_classes)]
    rows = (ManifestRow(f"c{i % num_classes:04d}/img{i:07d}.jpg", i % num_classes, width, height, 100_000,
                        f"{i:064x}") for i in range(num_images))
    digest = write_manifest(rows, names, root, out)
    return SimpleNamespace(path=out, root=Path(root), content_hash=digest, num_images=num_images,
                           num_classes=num_classes, class_names=tuple(names),
                           widths=np.full(num_images, width, np.int32), heights=np.full(num_images, height, np.int32),
                           paths_fmt="c{:04d}/img{:07d}.jpg")


def synthetic_cache_attrs(manifest_hash: str, num_images: int, class_names: Sequence[str], num_crops: int,
                          topk: int, images_per_shard: int, seed: int) -> dict[str, Any]:
    """Attributes shaped like stage 1's for a cache of synthetic soft labels (class names included:
    they are part of the real size), through the library's one builder."""
    from common.cache_storage import cache_attrs

    return cache_attrs(
        manifest={"hash": manifest_hash, "num_images": num_images},
        num_classes=len(class_names),
        teachers=[{"name": "synthetic", "timm_name": "synthetic", "weights": "none"}],
        ensemble={"rule": "mean_softmax", "temperature": 1.0},
        crops={"algorithm": "torchvision.RandomResizedCrop/counter-hash-v1", "num_crops": num_crops,
               "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip_p": 0.5, "seed": seed},
        k=topk, images_per_shard=images_per_shard,
        class_names=list(class_names),
        benchmark="synthetic soft labels (benchmarks/harness.py)",
    )


def _write_shards(job) -> None:
    """Worker: open the (already created) cache and write ``shards``; each writer owns its shards."""
    from common.cache_format import CacheWriter
    from common.crops import image_boxes

    path, attrs, widths, heights, shards, seed = job
    writer = CacheWriter(path, attrs)
    C, k, K = writer.layout.num_crops, writer.layout.topk, writer.layout.num_classes
    probs = np.sort(np.random.default_rng(seed).dirichlet(np.ones(k)) * 0.9)[::-1].astype(np.float16)
    for shard in shards:
        start, stop = writer.shard_range(shard)
        ids = np.arange(start, stop)
        b = image_boxes(seed, ids, widths[start:stop], heights[start:stop], C)
        base = (ids[:, None, None] * 7 + np.arange(C)[None, :, None] * 13) % K
        index = ((base + np.arange(k)) % K).astype(np.int64)
        prob = np.broadcast_to(probs, (stop - start, C, k))
        writer.write_shard(shard, b.as_array(), b.flip, index.reshape(-1, k), prob.reshape(-1, k))


def synthetic_cache(path: Path, manifest, num_crops: int, topk: int, images_per_shard: int, seed: int = 0,
                    workers: int = 1) -> Path:
    """A complete teacher cache for ``manifest`` written through ``CacheWriter``.

    Boxes and flips are the real seeded RandomResizedCrop draws for the manifest's
    image sizes (so stage 2 decodes/resizes realistic crops); top-k rows are fake
    but well formed (distinct classes, falling probabilities, mass 0.9).
    ``manifest`` needs content_hash, num_images, num_classes, class_names, widths,
    heights (a loaded Manifest, or any object with those). ``workers`` > 1 writes
    disjoint shard sets from that many processes, as ranks of stage 1 do.
    """
    from common.cache_format import CacheWriter

    attrs = synthetic_cache_attrs(manifest.content_hash, manifest.num_images, manifest.class_names, num_crops, topk,
                                  images_per_shard, seed)
    S = CacheWriter(path, attrs).layout.num_shards  # creates the arrays and attributes
    widths, heights = np.asarray(manifest.widths), np.asarray(manifest.heights)
    run_jobs(_write_shards, [(str(path), attrs, widths, heights, list(range(w, S, workers)), seed)
                             for w in range(workers)], workers)
    return path


# --------------------------------------------------------------------------- output


def fmt_num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}" if abs(value) >= 1 else f"{value:.{max(digits, 3)}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table of cells already formatted (``str`` of each)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header). Missing keys print as empty cells."""
    return md_table([h for _, h in columns],
                    ([fmt_num(row[k]) if k in row else "" for k, _ in columns] for row in rows))


def write_results(name: str, payload: dict[str, Any], out: str | None = None, quick: bool = False) -> Path:
    """Writes ``out``, else the recorded result benchmarks/results/NAME.json; a quick run's default is
    benchmarks/results/quick/NAME.json, so that a check never overwrites a recorded full run."""
    path = Path(out) if out else (RESULTS_DIR / "quick" if quick else RESULTS_DIR) / f"{name}.json"
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=_json_default) + "\n").encode())
    return path


def publish(name: str, payload: dict[str, Any], out: str | None, section: str, doc: str, tag: str = "") -> Path:
    """The end of an accuracy benchmark: its JSON written, its report printed and put in the marked
    section ``bench_NAME`` (``bench_NAME[TAG]`` with a ``tag``) of ``doc`` ('' = no document)."""
    path = write_results(name, payload, out)
    print("\n" + section + f"\nJSON: {path}", flush=True)
    if doc:
        update_marked_section(Path(doc), section, f"bench_{name}" + (f"[{tag}]" if tag else ""))
        print(f"markdown section updated in {doc}")
    return path


def finish(name: str, args: argparse.Namespace, info: dict[str, Any], payload: dict[str, Any]) -> Path:
    """The end of a performance benchmark: its JSON (the command, the machine, ``payload``, the load at the end)
    written where ``--out`` / ``--quick`` say, and where it went printed."""
    path = write_results(name, {"command": command_line(), "machine": info, **payload, "loadavg_at_end": loadavg()},
                         args.out, args.quick)
    print(f"\nwrote {path}")
    return path


def report_head(payload: dict[str, Any], title: str, end: str) -> list[str]:
    """An accuracy benchmark's report opens with its title and date, the command, the machine, the load at the
    end and the device; ``end`` finishes that last line."""
    return [f"{title} ({payload['finished_at']})", "", f"* **Command**: `{payload['command']}`",
            f"* **{machine_line(payload['machine'])}**; load average at the end {payload['loadavg_end']}; "
            f"device `{payload['device']}`{end}"]


def begin(workdir: str | Path) -> tuple[float, dict[str, Any], Path]:
    """Start of an accuracy benchmark: its clock, the machine (printed) and its work directory (created)."""
    started, info = time.time(), announce()
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    return started, info, path


def run_header(args: argparse.Namespace, started: float, info: dict[str, Any]) -> dict[str, Any]:
    """The fields every accuracy benchmark's JSON starts with: command, machine, device, load, time, args."""
    import torch

    on_gpu = torch.cuda.is_available() and getattr(args, "device", "auto") != "cpu"
    return {
        "command": command_line(),
        "machine": info,
        "device": "cuda" if on_gpu else "cpu",
        "loadavg_end": loadavg(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M"),
        "minutes": (time.time() - started) / 60,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
    }


def update_marked_section(path: Path, section: str, name: str) -> None:
    """Replace the text between ``<!-- NAME:begin ... -->`` and ``<!-- NAME:end -->`` in ``path``
    (appended when absent), so a benchmark owns its section of a hand-written document."""
    opening = f"<!-- {name}:begin (written by benchmarks/{name.split('[')[0]}.py) -->"
    closing = f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{opening}\n{section.rstrip()}\n{closing}"
    if opening in text and closing in text:
        head, rest = text.split(opening, 1)
        text = head + block + rest.split(closing, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_bytes(path, text.encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.ndarray)):
        return obj.tolist()  # Python ints and floats
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def median_of(runs: Iterable[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the rounds that measured it (None if none did)."""
    values = [run[key] for run in runs if run.get(key) is not None]
    return float(np.median(values)) if values else None


def profile_top(fn: Callable[[], Any]) -> list[dict[str, Any]]:
    """Run ``fn`` under cProfile (main thread only); the top 10 functions by own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values()) or 1e-9
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        where = f"{os.path.relpath(file, REPO) if file.startswith(str(REPO)) else Path(file).name}:{line}({func})"
        rows.append({"function": where, "calls": nc, "tottime_s": tt, "cumtime_s": ct, "tottime_pct": 100 * tt / total})
    return sorted(rows, key=lambda r: r["tottime_s"], reverse=True)[:10]


def profile_table(title: str, rows: Iterable[dict[str, Any]]) -> str:
    """``profile_top``'s rows under a heading that names what was profiled."""
    return f"\ncProfile, {title}, top 10 by own time:\n\n" + markdown_table(list(rows), [
        ("function", "function"), ("calls", "calls"), ("tottime_s", "tottime s"),
        ("tottime_pct", "% of main-thread time"), ("cumtime_s", "cumtime s")])


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------- stage 2 harness


class LimitedLoader:
    """The first ``steps`` batches of ``loader`` (no timing, no syncs of its own)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, min(steps, len(loader))
        self.num_samples_per_epoch = self.steps * (loader.num_samples_per_epoch // max(len(loader), 1))

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int):
        with contextlib.closing(self.loader.epoch(epoch)) as batches:
            yield from itertools.islice(batches, self.steps)


class TimedLoader(LimitedLoader):
    """Wraps a loader for ``train_one_epoch``: optional step cap, steady-state timestamps.

    The clock starts (after a device sync) just before batch ``warmup`` is
    fetched and stops (after a sync) once the last step has been issued, so
    the measured span covers fetch + train of steps ``warmup..n-1`` and
    neither the per-epoch start-up (plan, gather, pipeline fill, first-step
    autotuning) nor the epoch's tail.
    """

    def __init__(self, loader, warmup: int, device, max_steps: int | None = None):
        super().__init__(loader, len(loader) if max_steps is None else max_steps)
        self.warmup, self.device = warmup, device
        self.t_warm = self.t_end = None
        self.cpu_warm = self.cpu_end = None  # (main-thread CPU s, process CPU s)
        self.images = 0

    def epoch(self, epoch: int):
        self.images = 0
        with contextlib.closing(self.loader.epoch(epoch)) as batches:
            it = iter(batches)
            for i in range(self.steps):
                if i == self.warmup:
                    sync(self.device)
                    self.t_warm = time.perf_counter()
                    self.cpu_warm = (time.thread_time(), time.process_time())
                batch = next(it)
                if i >= self.warmup:
                    self.images += batch.images.shape[0]
                yield batch
            sync(self.device)
            self.t_end = time.perf_counter()
            self.cpu_end = (time.thread_time(), time.process_time())

    @property
    def img_per_s(self) -> float:
        return self.images / (self.t_end - self.t_warm)

    @property
    def cpu_ms_per_img(self) -> tuple[float, float]:
        """(training thread, whole process) CPU milliseconds per image over the timed span."""
        return tuple(1000 * (b - a) / max(self.images, 1) for a, b in zip(self.cpu_warm, self.cpu_end))


def timed_epoch(job, epoch: int, warmup: int, max_steps: int | None = None) -> dict[str, Any]:
    """Run the project's ``train_one_epoch`` on ``job`` (from ``train.setup``) through a :class:`TimedLoader`."""
    from stage2_student_distill.train import train_one_epoch

    timed = TimedLoader(job.train_loader, warmup, job.runtime.device, max_steps)
    load = loadavg()[0]
    with Timer() as t:
        out = train_one_epoch(replace(job, train_loader=timed), epoch)
    main_cpu, proc_cpu = timed.cpu_ms_per_img
    return {"img_per_s": timed.img_per_s, "epoch_img_per_s": out["img_per_s"], "steps": len(timed),
            "main_cpu_ms_per_img": main_cpu, "process_cpu_ms_per_img": proc_cpu,
            "warmup_steps": warmup, "timed_images": timed.images, "epoch_s": t.seconds,
            "losses": out["losses"], "load1": load}


# --------------------------------------------------------------------------- CUDA synchronisation points


def count_cuda_syncs(fn: Callable[[], Any]) -> dict[str, Any] | None:
    """Run ``fn`` with ``torch.cuda.set_sync_debug_mode("warn")``: how many host<->device synchronisations
    it makes, grouped by the Python line that triggered them (None without CUDA)."""
    import collections
    import warnings

    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = collections.Counter(f"{os.path.relpath(w.filename, REPO)}:{w.lineno}" for w in syncs)
    return {"total": len(syncs), "by_line": dict(where.most_common(12))}
