"""Build the bundled tiny mllama checkpoint (random weights, fixed seed) in Hugging Face format.

Shaped like Llama-3.2-11B-Vision in miniature: GQA, cross-attention layers not at index 0, 4 tiles,
260 visual tokens per 4-tile image, a byte-level BPE tokenizer with the Llama-3 special tokens and a
Llama-3.2-Vision-style chat template. Run: python scripts/build_tiny_mllama.py [OUT_DIR]
"""

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)

from pipeline.model.presets import init_weights

SEED = 0
OUT = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "tiny-mllama"
BASE_VOCAB = 384  # text vocabulary (lm_head width); <|image|> takes id BASE_VOCAB, as 128256 does in the 11B
SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
WORDS = (
    "the a an of to in is on at with and or what where which how many colour color shape red green blue yellow "
    "square circle triangle row column image picture describe this that there are left right top bottom middle "
    "small large one two three four five six seven eight nine ten yes no please answer question tell me about "
    "cat dog house tree sky sun car road water you it see look find count"
).split()


def build_tokenizer(base_vocab: int = BASE_VOCAB, words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on random sentences of `words`; <|image|> gets id `base_vocab`.

    The defaults build the bundled tiny-mllama tokenizer; a larger base_vocab merges whole words.
    """
    words = WORDS if words is None else words
    rng = torch.Generator().manual_seed(SEED)
    corpus = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=rng)) + "?"
        for _ in range(2000)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab - len(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIALS)  # ids BASE_VOCAB-8 .. BASE_VOCAB-1
    tok.add_special_tokens(["<|image|>"])  # id base_vocab
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=2048,
    )
    assert fast.convert_tokens_to_ids("<|image|>") == base_vocab, "image token must sit at vocab_size"
    return fast


VISION = dict(
    hidden_size=32, attention_heads=2, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
    intermediate_layers_indices=[0], vision_output_dim=64, image_size=64, patch_size=8, max_num_tiles=4,
)
TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=8,
            cross_attention_layers=[2, 5, 7])


def build_config(tok: PreTrainedTokenizerFast, vocab: int = BASE_VOCAB, vision: dict = VISION,
                 text: dict = TEXT) -> MllamaConfig:
    """An mllama config on this tokenizer's special tokens, `<|image|>` at id `vocab` as in the 11B model."""
    ids = tok.convert_tokens_to_ids
    text = dict(
        text, vocab_size=vocab, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=ids("<|begin_of_text|>"), pad_token_id=ids("<|finetune_right_pad_id|>"),
        eos_token_id=[ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=vocab)


def main(out: Path = OUT) -> None:
    torch.manual_seed(SEED)
    tok = build_tokenizer()
    config = build_config(tok)
    model = MllamaForConditionalGeneration(config).eval()
    init_weights(model, SEED)
    image_processor = MllamaImageProcessorPil(size={"height": 64, "width": 64}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    processor.save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json, as Llama-3.2-Vision checkpoints ship it
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.2f} MiB, {sum(p.numel() for p in model.parameters())} params)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
