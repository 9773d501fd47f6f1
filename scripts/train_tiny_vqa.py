"""Train a tiny mllama on the synthetic shapes VQA task (pipeline/synthetic.py) and save it in HF format.

The model follows Meta's reference where HF departs (pipeline/quality/reference.follow_reference): the vision tower
taps its intermediate layers at their input, and rows that see no image get no cross-attention output. The
first cross-attention layer's gates are held open and its visual input is randomly blinded or subsampled during
training, so it must learn where to look while the later cross-attention layers must read the image themselves:
the model is a real test of visual-token trimming.
Metrics (fresh samples; untrimmed, later cross layers blinded, later layers kept to the top/random tokens by the
first layer's attention) go to training.json. Run: python scripts/train_tiny_vqa.py  (seeded, 1 thread, ~45 min)
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from build_tiny_mllama import (  # noqa: E402
    CHAT_TEMPLATE,
    WORDS,
    build_config,
    build_tokenizer,
    init_weights,
)
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
)

from pipeline.quality.evaluate import blind, cross_layers  # noqa: E402
from pipeline.quality.reference import follow_reference  # noqa: E402
from pipeline.quality.synthetic import (  # noqa: E402
    CELL,
    LAYOUTS,
    MAX_OBJECTS,
    TILE,
    chat_messages,
    generate_samples,
)

OUT = ROOT / "pipeline" / "assets" / "tiny-mllama-vqa"
SEED = 0
VOCAB = 512  # text vocabulary; <|image|> is id VOCAB. Larger than tiny-mllama's 384 so every word is one token
TOKEN_WORDS = WORDS + ["squares", "circles", "triangles"]
TRAIN_SEED0 = 1_000_000  # batch k of training uses generate_samples(seed=TRAIN_SEED0 + k)
HELD_SEED0 = 2_000_000  # held-out set of curriculum level k: generate_samples(seed=HELD_SEED0 + k)
EVAL_SEED = 12345  # fresh samples for the final metrics, never used in training
LEVELS = [(1, 2), (1, 4), (2, 4), (4, 4), (4, 6), (4, MAX_OBJECTS)]  # curriculum: (max tiles, max objects)
HP = dict(
    batch=32, lr=2e-3, warmup=100, max_steps=6000, decay_steps=800, eval_every=50, held_out=128,
    advance_at=0.85, level_max_steps=500, finish_at=0.95, first_layer_blind=0.1, first_layer_keep=(0.05, 1.0),
    first_layer_gate=1.0,
)
VISION = dict(
    hidden_size=48, attention_heads=4, intermediate_size=96, num_hidden_layers=3, num_global_layers=1,
    intermediate_layers_indices=[1], vision_output_dim=96, image_size=TILE, patch_size=8, max_num_tiles=4,
)
TEXT = dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192, num_hidden_layers=8,
            cross_attention_layers=[2, 5, 7])


def build_processor() -> MllamaProcessor:
    image_processor = MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4)
    tokenizer = build_tokenizer(VOCAB, TOKEN_WORDS)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def encode(processor, samples, with_answer: bool) -> dict:
    """Chat-formatted prompts (+ answer and <|eot_id|> with loss labels if with_answer), padded to a batch."""
    prompts = [processor.apply_chat_template(chat_messages(s.prompt), add_generation_prompt=True) for s in samples]
    if with_answer:
        prompts = [p + s.answer + "<|eot_id|>" for p, s in zip(prompts, samples)]
    processor.tokenizer.padding_side = "right" if with_answer else "left"
    batch = processor(images=[[s.image] for s in samples], text=prompts, padding=True, return_tensors="pt")
    if with_answer:
        tok = processor.tokenizer
        labels = torch.full_like(batch["input_ids"], -100)
        for i, s in enumerate(samples):
            n_ans = len(tok(s.answer + "<|eot_id|>", add_special_tokens=False).input_ids)
            n = int(batch["attention_mask"][i].sum())
            labels[i, n - n_ans:n] = batch["input_ids"][i, n - n_ans:n]
        batch["labels"] = labels
    return batch


def degrade_first_layer(model, gen: torch.Generator):
    """Training-time hook: the first cross layer sees nothing (p=first_layer_blind) or a random subset of tokens."""
    def hook(module, args, kwargs):
        if not module.training:
            return args, kwargs
        states, mask = kwargs["cross_attention_states"], kwargs["cross_attention_mask"]
        b, n = mask.shape[0], mask.shape[-1]  # states: (batch * tiles, tokens per tile, hidden)
        lo, hi = HP["first_layer_keep"]
        keep_frac = lo + (hi - lo) * torch.rand(b, 1, generator=gen)
        keep = torch.rand(b, n, generator=gen) < keep_frac
        keep[:, 0] = True  # never mask a whole row (HF would then attend to everything)
        mask = mask.masked_fill(~keep[:, None, None, :], torch.finfo(mask.dtype).min)
        seen = (torch.rand(b, generator=gen) >= HP["first_layer_blind"]).to(states.dtype)
        kwargs["cross_attention_states"] = (states.view(b, -1, states.shape[-1]) * seen[:, None, None]).view_as(states)
        kwargs["cross_attention_mask"] = mask
        return args, kwargs

    return cross_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)


def exact_match_tf(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence: all answer tokens are the argmax (== greedy decoding gets the exact answer)."""
    pred, tgt = logits[:, :-1].argmax(-1), labels[:, 1:]
    return ((pred == tgt) | (tgt == -100)).all(-1).float()


@torch.no_grad()
def greedy_accuracy(model, processor, samples, batch: int = 32) -> dict:
    """Exact-match accuracy of greedy model.generate answers, overall and per question kind."""
    model.eval()
    hits, kinds = [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        inputs = encode(processor, chunk, with_answer=False)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=12)
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += [t.strip() == s.answer for t, s in zip(texts, chunk)]
        kinds += [s.kind for s in chunk]
    res = {"all": sum(hits) / len(hits)}
    for k in sorted(set(kinds)):
        sel = [h for h, kk in zip(hits, kinds) if kk == k]
        res[k] = sum(sel) / len(sel)
    return res


def restrict_later(model, keep_frac: float, by: str, gen: torch.Generator) -> list:
    """Later cross layers see only keep_frac of each image's visual tokens: the top ones by the first cross
    layer's attention (summed over heads and image-attending text tokens at prefill), or a random choice."""
    layers, state = cross_layers(model), {}

    def score(module, args, kwargs):
        states, mask, rows = kwargs["cross_attention_states"], kwargs["cross_attention_mask"], \
            kwargs["full_text_row_masked_out_mask"]
        if states is None:
            return
        attn, h = module.cross_attn, module.input_layernorm(args[0] if args else kwargs["hidden_states"])
        b, s, n = mask.shape[0], h.shape[1], mask.shape[-1]
        q = attn.q_norm(attn.q_proj(h).view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2))
        k = attn.k_norm(attn.k_proj(states).view(b, n, attn.num_key_value_heads, attn.head_dim).transpose(1, 2))
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
        probs = ((q @ k.transpose(-1, -2)) * attn.scaling + mask).softmax(-1) * rows
        valid = mask[:, 0, -1] == 0  # visual tokens of real tiles, as seen by the last prompt token
        imp = probs.sum((1, 2)) if by == "attention" else torch.rand(b, n, generator=gen)
        imp = imp.masked_fill(~valid, -1.0)
        keep = torch.zeros(b, n, dtype=torch.bool)
        for i in range(b):
            top = imp[i].topk(max(1, int(keep_frac * valid[i].sum()))).indices
            keep[i, top] = True
        state["drop"] = ~keep[:, None, None, :]

    def restrict(module, args, kwargs):
        kwargs["cross_attention_mask"] = kwargs["cross_attention_mask"].masked_fill(
            state["drop"], torch.finfo(kwargs["cross_attention_mask"].dtype).min)
        return args, kwargs

    return [layers[0].register_forward_pre_hook(score, with_kwargs=True)] + \
        [layer.register_forward_pre_hook(restrict, with_kwargs=True) for layer in layers[1:]]


def with_hooks(model, processor, samples, handles) -> dict:
    try:
        return greedy_accuracy(model, processor, samples)
    finally:
        for h in handles:
            h.remove()


def diagnostics(model, processor, n: int = 512, seed: int = EVAL_SEED) -> dict:
    """Accuracy on fresh samples: untrimmed, with later cross layers blinded, with the first one blinded."""
    samples = generate_samples(n, seed)
    layers = cross_layers(model)
    gen = torch.Generator().manual_seed(seed)
    res = {"n": n, "seed": seed, "full": greedy_accuracy(model, processor, samples)}
    res["later_cross_blinded"] = with_hooks(model, processor, samples, blind(layers[1:]))
    res["first_cross_blinded"] = with_hooks(model, processor, samples, blind(layers[:1]))
    for frac in (0.25, 0.1):
        for by in ("attention", "random"):
            res[f"later_cross_keep{frac:g}_by_{by}"] = with_hooks(
                model, processor, samples, restrict_later(model, frac, by, gen))
    return res


def lr_at(step: int, decay_start: int | None) -> float:
    warm = min(1.0, (step + 1) / HP["warmup"])
    if decay_start is None:
        return HP["lr"] * warm
    frac = min(1.0, (step - decay_start) / HP["decay_steps"])
    return HP["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def heldout_accuracy(model, batch: dict, kinds: list) -> dict:
    """Teacher-forced exact match per question kind (eval mode: the first cross layer is not degraded)."""
    model.eval()
    acc = exact_match_tf(model(**batch).logits, batch["labels"])
    res = {"all": round(acc.mean().item(), 3)}
    for k in sorted(set(kinds)):
        res[k] = round(acc[[i for i, kk in enumerate(kinds) if kk == k]].mean().item(), 3)
    return res


def train(model, processor, log=print) -> dict:
    """Adaptive curriculum over LEVELS: advance when held-out accuracy reaches advance_at (or after level_max_steps);
    at the last level, decay the learning rate once it reaches finish_at (or at max_steps - decay_steps)."""
    hook = degrade_first_layer(model, torch.Generator().manual_seed(SEED))
    opt = torch.optim.AdamW(model.parameters(), lr=HP["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    level, level_start, decay_start, step, held, acc = 0, 0, None, 0, None, {}
    t0 = time.time()
    while decay_start is None or step < decay_start + HP["decay_steps"]:
        tiles, objects = LEVELS[level]
        if held is None:
            samples = generate_samples(HP["held_out"], HELD_SEED0 + level, objects, tiles)
            held, kinds = encode(processor, samples, with_answer=True), [s.kind for s in samples]
        if decay_start is None and step >= HP["max_steps"] - HP["decay_steps"]:
            decay_start = step
            log(f"step {step}: out of steps at level {LEVELS[level]}, decaying lr")
        model.train()
        batch = encode(processor, generate_samples(HP["batch"], TRAIN_SEED0 + step, objects, tiles), with_answer=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, decay_start)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % HP["eval_every"]:
            continue
        acc = heldout_accuracy(model, held, kinds)
        log(f"step {step} loss {loss.item():.3f} level {LEVELS[level]} held-out {acc} "
            f"lr {lr_at(step, decay_start):.1e} {time.time() - t0:.0f}s")
        passed = acc["all"] >= HP["advance_at"] or step - level_start >= HP["level_max_steps"]
        if passed and level + 1 < len(LEVELS):
            level, level_start, held = level + 1, step, None
            log(f"step {step}: curriculum -> (max tiles, max objects) {LEVELS[level]}")
        elif acc["all"] >= HP["finish_at"] and level + 1 == len(LEVELS) and decay_start is None:
            decay_start = step
            log(f"step {step}: full difficulty learnt, decaying lr for {HP['decay_steps']} steps")
    hook.remove()
    return {"steps": step, "final_level": LEVELS[level], "final_held_out": acc, "decay_start": decay_start}


@torch.no_grad()
def init_vision(model) -> None:
    """After init_weights: patch embedding at 1/sqrt(fan_in) (position embeddings stay visible), vision gates open."""
    vision = model.model.vision_model
    vision.patch_embedding.weight.div_(vision.patch_embedding.weight[0].numel() ** 0.5)
    for name, p in vision.named_parameters():
        if name.endswith(("gate", "gate_attn", "gate_ffn")):
            p.fill_(0.5)


@torch.no_grad()
def init_positions(model, processor, scale: float = 2.0) -> None:
    """Start the per-aspect-ratio tile position embeddings as one-hot codes of each patch's global grid cell
    (dims 0-7: cell row, 8-15: cell column): without it position-in-words is learnt very slowly."""
    pe = model.model.vision_model.gated_positional_embedding
    cfg = model.config.vision_config
    side, per_cell = TILE // cfg.patch_size, CELL // cfg.patch_size
    table = pe.tile_embedding.weight.view(-1, cfg.max_num_tiles, side * side + 1, cfg.hidden_size)
    for th, tw in LAYOUTS:
        blank = Image.new("RGB", (tw * TILE, th * TILE))
        aid = int(processor.image_processor(images=[[blank]], return_tensors="pt")["aspect_ratio_ids"][0, 0])
        for t in range(th * tw):
            for p in range(side * side):
                row = 2 * (t // tw) + (p // side) // per_cell
                col = 2 * (t % tw) + (p % side) // per_cell
                code = table[aid, t, 1 + p]
                code[:16] = 0.0
                code[row] = code[8 + col] = scale
    pe.gate.fill_(1.0)


@torch.no_grad()
def hold_first_layer_open(model) -> None:
    """The first cross-attention layer's two gates fixed at first_layer_gate (tanh 0.76), not trained. Trained,
    they closed (~0): degraded in training, that layer was cheaper to switch off than to learn, so it never
    learnt where to look. Held open, its weights get gradient from step 0 and the layer cannot be switched off;
    the degradation still makes the later layers read the image themselves."""
    first = cross_layers(model)[0]
    for gate in (first.cross_attn_attn_gate, first.cross_attn_mlp_gate):
        gate.fill_(HP["first_layer_gate"])
        gate.requires_grad_(False)


def load(out: Path):
    """A saved checkpoint under Meta's reference, as it is trained (each tapped layer's input; no cross-attention
    output for rows that see no image)."""
    processor = MllamaProcessor.from_pretrained(out)
    model = MllamaForConditionalGeneration.from_pretrained(out)
    follow_reference(model)
    return model, processor


def save(model, processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    processor.tokenizer.padding_side = "right"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json too


def evaluate_saved(out: Path) -> None:
    model, processor = load(out)
    path = out / "training.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["metrics"] = diagnostics(model, processor)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["metrics"], indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 makes a run reproducible (the bundled checkpoint was trained so)")
    ap.add_argument("--max-steps", type=int, default=HP["max_steps"])
    ap.add_argument("--first-layer-blind", type=float, default=HP["first_layer_blind"])
    ap.add_argument("--eval-only", action="store_true", help="recompute the metrics of the checkpoint in --out")
    args = ap.parse_args()
    HP["max_steps"], HP["first_layer_blind"] = args.max_steps, args.first_layer_blind
    torch.set_num_threads(args.threads)
    if args.eval_only:
        return evaluate_saved(args.out)
    random.seed(SEED)
    torch.manual_seed(SEED)
    processor = build_processor()
    model = MllamaForConditionalGeneration(build_config(processor.tokenizer, VOCAB, VISION, TEXT))
    follow_reference(model)
    init_weights(model)
    init_vision(model)
    init_positions(model, processor)
    hold_first_layer_open(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters, hyper-parameters {HP}")
    t0, c0 = time.time(), time.process_time()
    info = train(model, processor)
    train_s, train_cpu_s = time.time() - t0, time.process_time() - c0
    metrics = diagnostics(model, processor)
    save(model, processor, args.out)
    report = {"train_seconds": round(train_s), "train_cpu_seconds": round(train_cpu_s), "threads": args.threads,
              "params": n_params, "hp": HP, "levels": LEVELS, **info, "metrics": metrics}
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
