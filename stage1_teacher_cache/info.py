"""`pipeline cache info`: what a teacher cache holds, read from its JSON attributes only."""
from __future__ import annotations

from typing import Any

from common.cache_format import CacheError, CacheReader, cache_files
from common.errors import cause_text
from stage1_teacher_cache.grow import growth_progress
from stage1_teacher_cache.label_agreement import format_label_agreement, read_label_agreement
from stage1_teacher_cache.teacher_eval import ensemble_warnings, percent, points, read_teacher_eval


def bytes_on_disk(path: str) -> int:
    """Total size of the cache's files, in a local directory or under an object-store prefix."""
    return sum(cache_files(path).values())


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:,.1f} {unit}"


def cache_info(path: str) -> dict[str, Any]:
    """JSON-ready description of a cache, complete or not."""
    reader = CacheReader(path, require_complete=False, _while_growing=True)  # info reports a growth in progress
    try:
        info = _describe(reader)
        format_cache_info(info)  # a descriptive attribute of the wrong type fails here, not after printing
    except CacheError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # CacheReader validated what readers use; the rest is only shown, so a forged value is named here
        raise CacheError(f"{path}: zarr.json: a cache attribute cannot be shown ({cause_text(e, 120)}); "
                         "this is not a cache written by this tool") from e
    return info


def _describe(reader: CacheReader) -> dict[str, Any]:
    path = reader.path
    a = reader.attrs
    evaluation = read_teacher_eval(a.get("teacher_eval"), f"{path}: zarr.json: teacher_eval") or {}
    files = a.get("teacher_files") or {}
    without = evaluation.get("leave_one_out") or {}
    teachers = [
        dict(t, file=files.get(t["name"]), eval=(evaluation.get("teachers") or {}).get(t["name"]),
             ensemble_without=without.get(t["name"]))  # the ensemble's top-1/top-5 without this teacher
        for t in a["teachers"]
    ]
    complete = reader.complete
    size = sum(reader.files.values())
    total_crops = reader.layout.num_images * reader.layout.num_crops
    return {
        "path": str(path),
        "format": a["format"],
        "version": a["version"],
        "tool_version": a.get("tool_version"),
        "created_at": a.get("created_at"),
        "manifest": dict(a["manifest"], path=a.get("manifest_path")),
        "num_classes": a["num_classes"],
        "class_names": a.get("class_names"),
        "teachers": teachers,
        "ensemble": a["ensemble"],
        "compute": a.get("compute"),
        "ensemble_eval": evaluation.get("ensemble"),
        "best_teacher_eval": evaluation.get("best_teacher"),
        "ensemble_warnings": ensemble_warnings(evaluation) if evaluation else [],
        "eval_manifest": evaluation.get("manifest"),
        "label_agreement": read_label_agreement(a.get("label_agreement"), f"{path}: zarr.json: label_agreement"),
        "crops": a["crops"],
        "storage": a["storage"],
        "shards": {
            "complete": int(complete.sum()),
            "total": int(len(complete)),
            "incomplete": [int(s) for s in (~complete).nonzero()[0]],
        },
        "bytes_on_disk": size,
        "bytes_per_crop": float(size / total_crops) if complete.all() and total_crops else None,
        # provenance of caches made from other caches (pipeline cache merge|subset|reduce, --reuse-crops) and
        # past growths (teacher-cache --more-crops); then one in progress, with its staging shards done
        **{key: a.get(key) for key in ("merge", "subset", "reduced", "crops_from", "grown")},
        "growing": a.get("growing") and dict(a["growing"], shards=growth_progress(path)),
    }


def format_cache_info(info: dict[str, Any]) -> str:
    m, c, s, sh = info["manifest"], info["crops"], info["storage"], info["shards"]
    names = info["class_names"] or []
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    lines = [
        f"cache         {info['path']}",
        f"format        {info['format']} v{info['version']} (tool {info['tool_version']}, created {info['created_at']})",
        f"manifest      {m['hash']} ({m['num_images']:,} images) {m.get('path') or ''}".rstrip(),
        f"classes       {info['num_classes']:,}" + (f": {shown}" if shown else ""),
        "teachers:",
    ]
    for t in info["teachers"]:
        p = t["preprocess"]
        weights = t["weights"] + (f" {t['file']}" if t.get("file") else "")
        if t.get("weights_sha256"):
            weights += f" sha256 {t['weights_sha256'][:16]}..."
        ev = t.get("eval")
        score = f"val top-1 {percent(ev['top1'])} top-5 {percent(ev['top5'])}" if ev else "not evaluated"
        if t.get("ensemble_without"):
            score += f"; ensemble without it top-1 {percent(t['ensemble_without']['top1'])}"
        lines += [
            f"  {t['name']} ({t['timm_name']}, {t['params'] / 1e6:.1f}M params): {p['input_size']} px {p['interpolation']}, "
            f"mean {_fmt(p['mean'], '.3f', '()')} std {_fmt(p['std'], '.3f', '()')}, crop_pct {p['crop_pct']:g}",
            f"    weights {weights}; {score}",
        ]
    e = info["ensemble"]
    ensemble = f"{e['rule']}, temperature {e['temperature']:g}"
    if info.get("ensemble_eval"):
        ensemble += (f"; val top-1 {percent(info['ensemble_eval']['top1'])} "
                     f"top-5 {percent(info['ensemble_eval']['top5'])}")
        best = info.get("best_teacher_eval")
        if best and len(info["teachers"]) > 1:
            ensemble += (f", {points(info['ensemble_eval']['top1'] - best['top1'])} over the best single teacher "
                         f"{best['name']} ({percent(best['top1'])})")
    compute = info.get("compute")
    lines += [
        f"ensemble      {ensemble}",
        f"computed on   {compute['device']} {compute['dtype']}, {compute['world_size']} process(es)" if compute
        else "computed on   unknown",
        f"crops         {c['num_crops']} per image, {c['algorithm']}, scale {_fmt(c['scale'])}, "
        f"ratio {_fmt(c['ratio'])}, flip p {c['flip_p']:g}, seed {c['seed']}",
        f"storage       top-{s['k']} {s['index_dtype']}/{s['prob_dtype']}, residual {s['residual']}, "
        f"{s['images_per_shard']:,} images per shard",
        f"complete      {sh['complete']}/{sh['total']} shards"
        + (f" (incomplete e.g. {sh['incomplete'][:10]})" if sh["incomplete"] else ""),
        f"on disk       {human_bytes(info['bytes_on_disk'])}"
        + (f" ({info['bytes_per_crop']:.1f} bytes per crop)" if info["bytes_per_crop"] else ""),
    ]
    lines += format_label_agreement(info.get("label_agreement"), names)
    lines += [f"warning       {w}" for w in info.get("ensemble_warnings") or []]
    return "\n".join(lines + _provenance(info))


def _provenance(info: dict[str, Any]) -> list[str]:
    lines = []
    if info.get("crops_from"):
        lines.append(f"crops from    {info['crops_from']}")
    if info.get("merge"):
        lines.append(f"merged        to top-{info['merge']['k']} from:")
        lines += [f"  {s['path']} (top-{s['k']}, weight {s['weight']:.3f}: {', '.join(s['teachers'])})"
                  for s in info["merge"]["sources"]]
    if sub := info.get("subset"):
        lines.append(f"subset        {sub['num_images']:,} images of {sub['source']} "
                     f"(manifest {sub['source_manifest']['hash'][:16]}...), selected by {sub['selection']}")
    for g in info.get("grown") or []:
        lines.append(f"grown         from {g['from_crops']} to {g['to_crops']} crops per image, {g['finished_at']}")
    if info.get("growing"):
        g, done = info["growing"], info["growing"]["shards"]
        lines.append(f"GROWING       from {g['from_crops']} to {g['to_crops']} crops per image ({g['phase']}"
                     + (f", {done[0]}/{done[1]} shards" if done else "") + "): not readable until the "
                     "`teacher-cache --more-crops` run finishes")
    if r := info.get("reduced"):
        lines.append(f"reduced       to top-{r['k']} from top-{r['source_k']} of {r['source']}")
    return lines


def _fmt(values, spec: str = ".4g", brackets: str = "[]") -> str:
    return brackets[0] + ", ".join(f"{v:{spec}}" for v in values) + brackets[1]
