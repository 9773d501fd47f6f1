"""`crosstrim eval`: what trimming costs in accuracy. Per k_ratio (topk_union) and target fraction (target):
exact-match accuracy (or agreement with the untrimmed output when there are no labels), the kept fraction (mean and
per-image spread), and a control keeping as many tokens per image chosen at random; under two protocols (later
layers trimmed, as the paper; every layer trimmed). Also first-layer attention sparsity, inter-layer consistency and
(synthetic samples) the first layer's attention share on the asked object. Accuracy runs the server's stages."""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.sampling import SamplingParams
from pipeline.errors import CrosstrimError
from pipeline.model.selection import head_scores
from pipeline.quality.reference import capture_cross_probs, trim_generated

PROTOCOLS = {"later": False, "all": True}  # protocol -> TrimConfig.trim_first_layer


@dataclass
class Row:
    id: str
    image: Image.Image
    prompt: str
    answer: str | None
    kind: str = ""


def add_args(sub) -> None:
    p = sub.add_parser("eval", help="accuracy against kept fraction, trimmed vs random, and attention diagnostics")
    p.add_argument("--model", default="bundled:tiny-mllama-vqa")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="Parquet with id, prompt, image (bytes) or image_uri, optional answer")
    src.add_argument("--synthetic", type=int, metavar="N", help="N fresh samples of the synthetic task")
    p.add_argument("--seed", type=int, default=777, help="seed of the synthetic samples (not a training seed)")
    p.add_argument("--k-ratios", default="1,0.5,0.3,0.2,0.1")
    p.add_argument("--target-fractions", default="0.5,0.3,0.2",
                   help="policy target: each image keeps exactly this fraction (sizes KV in advance)")
    p.add_argument("--target-at-topk", action="store_true",
                   help="also run target at each topk_union k_ratio's mean kept fraction (same KV on average)")
    p.add_argument("--protocols", default="later,all")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--diagnostic-samples", type=int, default=32)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--figure", help="PNG: accuracy against kept fraction, and a first-layer attention heat map")


def load_rows(args) -> list[Row]:
    if args.synthetic:
        from pipeline.quality.synthetic import generate_samples

        return [Row(s.id, s.image, s.prompt, s.answer, s.kind) for s in generate_samples(args.synthetic, args.seed)]
    import pyarrow.parquet as pq

    from pipeline.model.inputs import decode_image, read_image_file

    table = pq.read_table(args.dataset).to_pylist()
    rows = []
    for r in table:
        img = decode_image(r["image"]) if r.get("image") is not None else read_image_file(r["image_uri"])
        rows.append(Row(str(r["id"]), img, r["prompt"], r.get("answer")))
    return rows


def _generate(pipe, sources, max_tokens: int) -> list[str]:
    seqs = pipe.engine.generate(sources, SamplingParams(max_tokens=max_tokens))
    return [s.text.strip() for s in seqs]


def _accuracy(texts: list[str], labels: list[str]) -> float:
    return sum(t == lab.strip() for t, lab in zip(texts, labels)) / len(labels)


def evaluate(pipe, rows: list[Row], k_ratios: list[float], protocols: list[str], max_tokens: int,
             target_fractions: list[float] = (), target_at_topk: bool = False) -> dict:
    """Accuracy per policy setting against its random control (per image, as many tokens as the policy kept).
    `target_at_topk`: also run the target policy at each topk_union setting's mean kept fraction (below 1)."""
    prepared = [pipe.prepare(r.prompt, [r.image]) for r in rows]
    visual = [pipe.encoder.encode(p) for p in prepared]
    trim = pipe.trimmer.trim
    untrimmed = _generate(pipe, [trim(p, v, TrimConfig(policy="none")) for p, v in zip(prepared, visual)], max_tokens)
    labelled = all(r.answer is not None for r in rows)
    labels = [r.answer for r in rows] if labelled else untrimmed
    kinds = sorted({r.kind for r in rows if r.kind})

    def point(policy: str, knob: str, value: float, cfg: TrimConfig) -> dict:
        trims = [trim(p, v, cfg) for p, v in zip(prepared, visual)]
        texts = _generate(pipe, trims, max_tokens)
        controls = [trim(p, v, TrimConfig(policy="random", budget_tokens=t.image.kept_tokens[0], seed=i,
                                          trim_first_layer=cfg.trim_first_layer))
                    for i, (p, v, t) in enumerate(zip(prepared, visual, trims))]
        random_texts = _generate(pipe, controls, max_tokens)
        kept = [t.image.kept_fraction for t in trims]
        out = {"policy": policy, knob: value, "kept_fraction": statistics.mean(kept),
               # per image: how well an operator can predict the KV a request will hold
               "kept_fraction_min": min(kept), "kept_fraction_max": max(kept),
               "kept_fraction_stdev": statistics.pstdev(kept),
               "random_kept_fraction": statistics.mean(t.image.kept_fraction for t in controls),
               "accuracy": _accuracy(texts, labels), "random_accuracy": _accuracy(random_texts, labels)}
        for kind in kinds:
            idx = [i for i, r in enumerate(rows) if r.kind == kind]
            out[f"accuracy_{kind}"] = _accuracy([texts[i] for i in idx], [labels[i] for i in idx])
            out[f"random_accuracy_{kind}"] = _accuracy([random_texts[i] for i in idx], [labels[i] for i in idx])
        return out

    result = {"samples": len(rows), "metric": "exact match" if labelled else "agreement with untrimmed",
              "untrimmed_accuracy": _accuracy(untrimmed, labels),
              "later_layers_blinded_accuracy": _accuracy(later_blinded_texts(pipe, prepared, max_tokens), labels),
              "protocols": {}}
    for protocol in protocols:
        first = PROTOCOLS[protocol]
        points = [point("topk_union", "k_ratio", k, TrimConfig(k_ratio=k, trim_first_layer=first)) for k in k_ratios]
        fractions = list(target_fractions)
        if target_at_topk:
            fractions += [p["kept_fraction"] for p in points if p["kept_fraction"] < 1]
        points += [point("target", "target_fraction", f,
                         TrimConfig(policy="target", target_fraction=f, trim_first_layer=first)) for f in fractions]
        result["protocols"][protocol] = points
    return result


def cross_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, MllamaCrossAttentionDecoderLayer)]


def blind(layers) -> list:
    """Zero the visual input of these cross-attention layers (their attention output becomes 0, for every row);
    returns hook handles. Zeroing rather than masking: an all-masked row in HF mllama attends to everything.
    During generate the zero K/V computed at prefill stays in the cache."""
    def hook(module, args, kwargs):
        if kwargs.get("cross_attention_states") is not None:
            kwargs["cross_attention_states"] = torch.zeros_like(kwargs["cross_attention_states"])
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]


@torch.inference_mode()
def later_blinded_texts(pipe, prepared: list, max_tokens: int, blinded: bool = True) -> list[str]:
    """Greedy answers of HF's own generate with the later cross-attention layers blinded: if accuracy stays high,
    the later layers do not read the image and no selection there can be judged."""
    model = pipe.loaded.model
    handles = blind(cross_layers(model)[1:]) if blinded else []
    tok = pipe.loaded.processor.tokenizer
    try:
        texts = []
        for p in prepared:
            out = model.generate(**p.hf_inputs(), max_new_tokens=max_tokens, do_sample=False)
            ids = trim_generated(out[0, p.input_ids.numel():].tolist(), model)
            texts.append(tok.decode(ids, skip_special_tokens=True).strip())
        return texts
    finally:
        for h in handles:
            h.remove()


def diagnostics(pipe, rows: list[Row], k_ratio: float, mass: float = 0.9) -> dict:
    """First-layer sparsity (per head, the share of tokens holding `mass` of its attention) and, per later
    cross-attention layer, how much of its top-attended tokens (holding `mass`) the kept set covers."""
    model = pipe.loaded.model
    first, later = pipe.loaded.first_cross, pipe.loaded.cross_layers[1:]
    sparsity, coverage = [], {idx: [] for idx in later}
    for r in rows:
        prepared = pipe.prepare(r.prompt, [r.image])
        probs = capture_cross_probs(model, prepared.hf_inputs())
        tiles = prepared.cross_attention_mask.shape[-1]
        per_tile = probs[first].shape[-1] // tiles
        token_visible = prepared.token_visible(per_tile)
        valid = token_visible.any(dim=0)
        scores = head_scores(probs[first], token_visible)[:, valid]
        sparsity.append([_share_for_mass(h, mass) for h in scores])
        trimmed = pipe.trim(prepared, TrimConfig(k_ratio=k_ratio))
        kept = set(trimmed.image.kept_index.tolist())
        valid_idx = valid.nonzero().squeeze(1)
        for idx in later:
            total = head_scores(probs[idx], token_visible)[:, valid].sum(dim=0)
            top = valid_idx[_top_for_mass(total, mass)].tolist()
            coverage[idx].append(len(kept & set(top)) / len(top))
    per_head = torch.tensor(sparsity).mean(dim=0).tolist()
    return {"mass": mass, "k_ratio": k_ratio,
            "first_layer_share_for_mass_per_head": [round(x, 4) for x in per_head],
            "first_layer_share_for_mass_mean": round(statistics.mean(per_head), 4),
            "later_layer_coverage_by_kept": {str(i): round(statistics.mean(v), 4) for i, v in coverage.items()}}


def _top_for_mass(scores: torch.Tensor, mass: float) -> torch.Tensor:
    order = torch.sort(scores, descending=True, stable=True).indices
    cum = scores[order].cumsum(0)
    return order[: int((cum < mass * cum[-1]).sum()) + 1]


def _share_for_mass(scores: torch.Tensor, mass: float) -> float:
    return len(_top_for_mass(scores, mass)) / scores.numel()


def heat_map(pipe, row: Row, ax_image, ax_heat) -> None:
    """The first layer's head-summed attention over one image's tiles, laid out as the image."""
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_all_supported_aspect_ratios,
    )

    prepared = pipe.prepare(row.prompt, [row.image])
    first = pipe.loaded.first_cross
    probs = capture_cross_probs(pipe.loaded.model, prepared.hf_inputs(), [first])[first]
    tiles = prepared.cross_attention_mask.shape[-1]
    per_tile = probs.shape[-1] // tiles
    token_visible = prepared.token_visible(per_tile)
    scores = head_scores(probs, token_visible).sum(dim=0).reshape(tiles, per_tile)[:, 1:]  # drop each tile's class token
    side = round((per_tile - 1) ** 0.5)
    rows_t, cols_t = get_all_supported_aspect_ratios(tiles)[int(prepared.aspect_ratio_ids[0, 0]) - 1]
    grid = torch.zeros(rows_t * side, cols_t * side)
    for t in range(rows_t * cols_t):
        r, c = divmod(t, cols_t)
        grid[r * side : (r + 1) * side, c * side : (c + 1) * side] = scores[t].reshape(side, side)
    ax_image.imshow(row.image)
    ax_image.set_title(row.prompt, fontsize=8)
    ax_heat.imshow(grid.numpy(), cmap="magma")
    ax_heat.set_title("first cross-attention layer: attention per visual token", fontsize=8)
    for ax in (ax_image, ax_heat):
        ax.axis("off")


def plot(pipe, result: dict, row: Row, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for protocol, style in zip(result["protocols"], ("-", "--")):
        pts = result["protocols"][protocol]
        topk = [p for p in pts if p["policy"] == "topk_union"]
        target = sorted((p for p in pts if p["policy"] == "target"), key=lambda p: p["kept_fraction"])
        xs = [p["kept_fraction"] for p in topk]
        axes[0].plot(xs, [p["accuracy"] for p in topk], "o" + style, color="C0", label=f"Trimmed Llama ({protocol})")
        axes[0].plot(xs, [p["random_accuracy"] for p in topk], "s" + style, color="C3", label=f"random ({protocol})")
        if target:
            axes[0].plot([p["kept_fraction"] for p in target], [p["accuracy"] for p in target], "^" + style,
                         color="C2", label=f"target fraction ({protocol})")
    axes[0].axhline(result["untrimmed_accuracy"], color="grey", lw=0.8, label="untrimmed")
    axes[0].axhline(result["later_layers_blinded_accuracy"], color="grey", lw=0.8, ls=":",
                    label="later layers blinded")
    axes[0].set_xlabel("kept fraction of visual tokens")
    axes[0].set_ylabel(result["metric"])
    axes[0].legend(fontsize=7)
    heat_map(pipe, row, axes[1], axes[2])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run(args) -> int:
    from pipeline.inprocess import Pipeline

    k_ratios = [float(x) for x in args.k_ratios.split(",")]
    protocols = args.protocols.split(",")
    if not set(protocols) <= PROTOCOLS.keys():
        raise CrosstrimError(f"protocols are {sorted(PROTOCOLS)}")
    pipe = Pipeline(ModelConfig(source=args.model),
                    engine=EngineConfig(kv_budget_bytes=1 << 30, max_running=128, max_waiting=1 << 20))
    rows = load_rows(args)
    targets = [float(x) for x in args.target_fractions.split(",") if x]
    result = evaluate(pipe, rows, k_ratios, protocols, args.max_tokens, targets, args.target_at_topk)
    result["diagnostics"] = diagnostics(pipe, rows[: args.diagnostic_samples], TrimConfig().k_ratio)
    if args.synthetic:  # the layout says where the asked object is
        from pipeline.quality.attention_share import attention_share
        from pipeline.quality.synthetic import generate_samples

        result["first_layer_target_share"] = attention_share(pipe, generate_samples(args.synthetic, args.seed))
    print(f"{result['samples']} samples, {result['metric']}; untrimmed {result['untrimmed_accuracy']:.3f}, "
          f"later cross-attention layers blinded {result['later_layers_blinded_accuracy']:.3f}")
    for protocol, pts in result["protocols"].items():
        for p in pts:
            knob = f"k_ratio {p['k_ratio']:<5}" if "k_ratio" in p else f"target {p['target_fraction']:<6.4g}"
            print(f"  {protocol:5s} {knob} kept {p['kept_fraction']:.3f} (per image {p['kept_fraction_min']:.3f}"
                  f"..{p['kept_fraction_max']:.3f}, sd {p['kept_fraction_stdev']:.3f})  "
                  f"accuracy {p['accuracy']:.3f}  random {p['random_accuracy']:.3f}")
    print(json.dumps(result["diagnostics"]))
    if "first_layer_target_share" in result:
        share = result["first_layer_target_share"]
        print(f"first cross-attention layer: {share['share']:.3f} of its attention on the asked object's tokens, "
              f"uniform {share['uniform']:.3f} ({share['ratio']:.2f}x; {share['n']} cell questions)")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    if args.figure:
        plot(pipe, result, rows[0], args.figure)
    return 0
