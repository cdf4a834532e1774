#!/usr/bin/env python3
"""Reference fixture for the Rust Qwen2-VL port: tiny random models run through transformers.

Default mode regenerates apps/r1-sgg/fixtures/qwen2_vl/ (see the README there for every file):

    python apps/r1-sgg/scripts/qwen2_vl_fixture.py

Check mode loads a checkpoint directory (e.g. one written by the Rust crate) with transformers'
from_pretrained, runs the fixture's batch and compares the logits with the committed reference:

    python apps/r1-sgg/scripts/qwen2_vl_fixture.py --check-saved DIR [--variant untied|tied_hub]

Everything is seeded and runs on one CPU thread, so a rerun writes byte-identical tensors.
"""

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import PIL
import safetensors.torch
import tokenizers
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.image_utils import SizeDict

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "qwen2_vl"

VOCAB_SIZE = 1024
# Qwen2-VL's special tokens in the real vocabulary's relative order (151643..151656 there);
# here they take the top 14 ids, 1010..1023.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
SPECIAL_IDS = {tok: VOCAB_SIZE - len(SPECIAL_TOKENS) + i for i, tok in enumerate(SPECIAL_TOKENS)}

# Qwen2's pre-tokenizer split (tokenization_qwen2.py PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Verbatim chat_template of Qwen/Qwen2-VL-2B-Instruct / -7B-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 40
IMAGES = {"wide.png": (150, 100), "tall.png": (200, 300)}  # name -> (width, height)

TEXT_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    rope_theta=1e6,
    mrope_section=[2, 3, 3],
    use_sliding_window=False,
    sliding_window=32768,
    max_window_layers=2,
    bos_token_id=SPECIAL_IDS["<|endoftext|>"],
    eos_token_id=SPECIAL_IDS["<|im_end|>"],
)
VISION_CONFIG = dict(
    depth=2,
    embed_dim=32,
    hidden_size=64,
    num_heads=4,
    mlp_ratio=4,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
# Seeds picked among 1..8 so that greedy decoding does not collapse into one repeated token
# (random tied models tend to echo their last input) and every argmax wins by > MIN_GREEDY_GAP.
VARIANT_SEEDS = {"untied": 6, "tied_hub": 2}

# Gradients the fixture stores, by Hub tensor name.
GRAD_NAMES = [
    "visual.patch_embed.proj.weight",
    "visual.blocks.0.norm1.weight",
    "visual.blocks.1.attn.qkv.weight",
    "visual.blocks.0.attn.qkv.bias",
    "visual.merger.ln_q.bias",
    "visual.merger.mlp.0.weight",
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]
GREEDY_TOKENS = 20
MIN_GREEDY_GAP = 0.01
# Embedding / LM-head scale: logits spread over about +-6; larger values make the tied model
# repeat whatever token it was fed (its own embedding dominates the head's dot product).
EMBED_STD = 0.15
CHECK_TOLERANCE = 1e-4

# ---------------------------------------------------------------------------------------------
# Text: a corpus that looks like R1-SGG prompts and answers, and the two fixture conversations.

OBJECTS = (
    "airplane animal arm bag banana basket beach bear bed bench bike bird board boat book boot "
    "bottle bowl box boy branch building bus cabinet cap car cat chair child clock coat counter "
    "cow cup curtain desk dog door drawer ear elephant engine eye face fence finger flag flower "
    "food fork fruit giraffe girl glass glove guy hair hand handle hat head helmet hill horse "
    "house jacket jean kid kite lady lamp laptop leaf leg letter light logo man men motorcycle "
    "mountain mouth neck nose number orange pant paper paw people person phone pillow pizza "
    "plane plant plate player pole post pot racket railing rock roof room screen seat sheep "
    "shelf shirt shoe short sidewalk sign sink skateboard ski skier sneaker snow sock stand "
    "street surfboard table tail tie tile tire toilet towel tower track train tree truck trunk "
    "umbrella vase vegetable vehicle wave wheel window windshield wing wire woman zebra"
).split()
PREDICATES = (
    "above|across|against|along|and|at|attached to|behind|belonging to|between|carrying|"
    "covered in|covering|eating|flying in|for|from|growing on|hanging from|has|holding|in|"
    "in front of|laying on|looking at|lying on|made of|mounted on|near|of|on|on back of|over|"
    "painted on|parked on|part of|playing|riding|says|sitting on|standing on|to|under|using|"
    "walking in|walking on|watching|wearing|wears|with"
).split("|")
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful and multimodal AI assistant.",
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think><answer> answer here </answer>",
]
INSTRUCTIONS = [
    "Generate a structured scene graph for this image. List the objects with an id and a "
    "bounding box [x1, y1, x2, y2] and the relationships between them as JSON with the keys "
    '"objects" and "relationships".',
    "Describe the image as a scene graph in JSON.",
    "Detect the objects in the image and the relations between them. Answer with JSON only.",
    "Output the scene graph of the image: objects with boxes, then subject-predicate-object triplets.",
    "You are given an image. Identify the salient objects, assign each a unique id such as "
    '"person.1", estimate its bounding box in pixel coordinates, and then describe how pairs of '
    "objects relate to each other using short predicates. Think step by step, verify every box, "
    "avoid duplicates, and keep the output strictly valid.",
]


def scene_graph_answer(objects, relationships):
    """R1-SGG's SFT target layout: a fenced JSON block, one object/relationship per line."""

    def items(xs):
        return "[\n" + ",\n".join("    " + json.dumps(x) for x in xs) + "\n  ]" if xs else "[]"

    return f'```json\n{{\n  "objects": {items(objects)},\n  "relationships": {items(relationships)}\n}}\n```'


def random_scene(rng):
    names = rng.choice(OBJECTS, size=int(rng.integers(2, 6)), replace=False)
    objects = []
    for name in names:
        x1, y1 = (int(v) for v in rng.integers(0, 600, size=2))
        w, h = (int(v) for v in rng.integers(20, 400, size=2))
        objects.append({"id": f"{name}.{int(rng.integers(1, 4))}", "bbox": [x1, y1, x1 + w, y1 + h]})
    relationships = []
    for _ in range(int(rng.integers(1, 4))):
        s, o = rng.choice(len(objects), size=2, replace=False)
        relationships.append(
            {
                "subject": objects[s]["id"],
                "predicate": str(rng.choice(PREDICATES)),
                "object": objects[o]["id"],
            }
        )
    return objects, relationships


def corpus():
    """Chat-shaped R1-SGG samples without special tokens (those are added after training)."""
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(3000):
        system = SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]
        instruction = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
        answer = scene_graph_answer(*random_scene(rng))
        texts.append(f"system\n{system}\nuser\n{instruction}\nassistant\n{answer}\n")
    texts.append("Object categories: " + json.dumps(OBJECTS) + "\nPredicates: " + json.dumps(PREDICATES))
    return texts


# Case 0 is the longer conversation on the wide image, case 1 the shorter one on the tall image.
CASES = [
    {
        "image": "wide.png",
        "instruction": INSTRUCTIONS[1],
        "answer": scene_graph_answer(
            [{"id": "man.1", "bbox": [12, 40, 300, 620]}, {"id": "horse.1", "bbox": [80, 210, 640, 900]}],
            [{"subject": "man.1", "predicate": "riding", "object": "horse.1"}],
        ),
    },
    {
        "image": "tall.png",
        "instruction": INSTRUCTIONS[2],
        "answer": scene_graph_answer([{"id": "tree.1", "bbox": [5, 0, 980, 730]}], []),
    },
]


def messages(case, with_answer):
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": f"images/{case['image']}"},
                {"type": "text", "text": case["instruction"]},
            ],
        }
    ]
    if with_answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": case["answer"]}]})
    return msgs


# ---------------------------------------------------------------------------------------------
# Tokenizer, images, processor.


def build_tokenizer():
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE - len(SPECIAL_TOKENS), "corpus too small for the vocab"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert all(tok.token_to_id(t) == i for t, i in SPECIAL_IDS.items())
    return Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )


def make_image(width, height, seed):
    """Smooth colour gradients, a disc and a bar, plus mild noise: every resize tap matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / (width - 1), y / (height - 1)
    img = np.stack([255 * u, 255 * v, 128 + 100 * np.sin(6 * u + 4 * v)], axis=-1)
    disc = (x - 0.35 * width) ** 2 + (y - 0.55 * height) ** 2 < (0.22 * min(width, height)) ** 2
    img[disc] = [230, 40, 60]
    bar = (np.abs(x - 0.7 * width) < 0.08 * width) & (y > 0.15 * height) & (y < 0.85 * height)
    img[bar] = [20, 60, 200]
    img += rng.normal(0, 3, size=img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def build_processor(tokenizer):
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def resized_uint8(image_processor, image):
    """The image after the processor's own smart_resize + PIL bicubic, as uint8 [H, W, 3]."""
    chw = np.moveaxis(np.asarray(image), -1, 0)
    out = image_processor.resize(
        chw,
        size=SizeDict(shortest_edge=MIN_PIXELS, longest_edge=MAX_PIXELS),
        resample=image_processor.resample,
        factor=image_processor.patch_size * image_processor.merge_size,
    )
    assert out.dtype == np.uint8
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def pixels_from_resized(image_processor, resized):
    """Rescale, normalize and patchify a resized image exactly as the processor does."""
    chw = np.moveaxis(resized, -1, 0)
    chw = image_processor.rescale(chw, image_processor.rescale_factor)
    chw = image_processor.normalize(chw, image_processor.image_mean, image_processor.image_std)
    patches, _, _ = image_processor.patchify(
        chw, image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    )
    return torch.from_numpy(np.ascontiguousarray(patches))


# ---------------------------------------------------------------------------------------------
# Models.


def model_config(tied):
    text = dict(TEXT_CONFIG)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": text.pop("mrope_section"),
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=dict(VISION_CONFIG),
        image_token_id=SPECIAL_IDS["<|image_pad|>"],
        video_token_id=SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_IDS["<|vision_end|>"],
        tie_word_embeddings=tied,
    )


def build_model(tied, seed):
    """A tiny model whose every parameter is overwritten with seeded values of a useful scale.

    Defaults (ones for norms, zeros for biases, 0.02-std matrices) would leave whole ops
    untested and the logits nearly flat; here every norm weight and bias differs from its
    identity value and logits spread over several units.
    """
    config = model_config(tied)
    config._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(".bias"):
                param.copy_(0.1 * noise)
            elif param.ndim == 1:  # LayerNorm / RMSNorm scales
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param.copy_(EMBED_STD * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))
    if tied:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return model.eval()


def hub_name(name):
    """In-memory transformers 5.x parameter name -> checkpoint (Hub) name."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def forward(model, batch, labels=None):
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        # 5.x get_rope_index finds image blocks through mm_token_type_ids (1 = image), not ids.
        mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).long(),
        labels=labels,
        use_cache=False,
    )


def greedy(model, prompt):
    """20 greedy tokens from generate(), checked against a plain argmax loop without a cache.

    eos_token_id is None so generation cannot stop early, and the config carries no sampling
    or penalty settings, so no logits processor touches the scores. Returns the tokens and the
    smallest top-1 minus top-2 logit gap over the steps (how far a port may drift before an
    argmax flips).
    """
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=GREEDY_TOKENS,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=SPECIAL_IDS["<|endoftext|>"],
    )
    start = prompt["input_ids"].shape[1]
    out = model.generate(
        **prompt,
        mm_token_type_ids=(prompt["input_ids"] == model.config.image_token_id).long(),
        generation_config=config,
    )
    new = out[:, start:]
    assert new.shape == (1, GREEDY_TOKENS), new.shape

    ids, margin = prompt["input_ids"], math.inf
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            step = dict(prompt, input_ids=ids, attention_mask=torch.ones_like(ids))
            last = forward(model, step).logits[:, -1]
            top2 = last[0].topk(2).values
            margin = min(margin, (top2[0] - top2[1]).item())
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids[:, start:], new), "generate() != argmax loop"
    assert margin > MIN_GREEDY_GAP, f"greedy argmax nearly tied ({margin}); pick another seed"
    return new, margin


def reference(model, batch, labels, tied):
    """Logits, loss and the GRAD_NAMES gradients of one model on the fixture batch."""
    model.zero_grad(set_to_none=True)
    out = forward(model, batch, labels=labels)
    out.loss.backward()
    params = {hub_name(n): p for n, p in model.named_parameters()}
    grads = {
        f"grad.{n}": params[n].grad.detach().clone()
        for n in GRAD_NAMES
        if not (tied and n == "lm_head.weight")
    }
    model.zero_grad(set_to_none=True)
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), **grads}


# ---------------------------------------------------------------------------------------------
# Hub layout.


def hub_config(config):
    """The flat config.json layout of Qwen/Qwen2-VL-2B-Instruct, with this model's values."""
    text, vision = config.text_config, config.vision_config
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_token_id": SPECIAL_IDS["<|vision_pad|>"],
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.max_window_layers,
        "model_type": "qwen2_vl",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],
        "sliding_window": TEXT_CONFIG["sliding_window"],
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision.depth,
            "embed_dim": vision.embed_dim,
            "mlp_ratio": vision.mlp_ratio,
            "num_heads": vision.num_heads,
            "in_chans": vision.in_channels,
            "hidden_size": vision.hidden_size,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "spatial_patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "model_type": "qwen2_vl",
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(text.rope_parameters["mrope_section"])},
        "vocab_size": text.vocab_size,
    }


def save_reference(tensors, path, metadata):
    """safetensors file whose metadata keys are sorted.

    The safetensors library keeps metadata in a hash map, so its key order (and the file's
    bytes) would change from run to run; sorting it keeps reruns byte-identical.
    """
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length, same padding
    assert len(text) == n
    path.write_bytes(data[:8] + text + data[8 + n :])


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_hub_layout(model, tokenizer, out_dir):
    """Write the tied model the way the Hub publishes Qwen2-VL: flat config, two shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", hub_config(model.config))
    write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": SPECIAL_IDS["<|endoftext|>"],
            "pad_token_id": SPECIAL_IDS["<|endoftext|>"],
            "do_sample": True,
            "eos_token_id": [SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]],
            "repetition_penalty": 1.0,
            "temperature": 0.01,
            "top_p": 0.001,
            "top_k": 1,
        },
    )

    tensors = {hub_name(n): p.detach().contiguous() for n, p in model.named_parameters()}
    assert "lm_head.weight" not in tensors  # tied: named_parameters lists the embedding only
    shards = [
        {n: t for n, t in tensors.items() if n.startswith("visual.") or n == "model.embed_tokens.weight"},
        {
            n: t
            for n, t in tensors.items()
            if not (n.startswith("visual.") or n == "model.embed_tokens.weight")
        },
    ]
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )

    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(
        out_dir / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for t, i in SPECIAL_IDS.items()
            },
            "additional_special_tokens": SPECIAL_TOKENS[1:],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    write_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(
        out_dir / "preprocessor_config.json",
        {
            "min_pixels": MIN_PIXELS,
            "max_pixels": MAX_PIXELS,
            "patch_size": VISION_CONFIG["patch_size"],
            "temporal_patch_size": VISION_CONFIG["temporal_patch_size"],
            "merge_size": VISION_CONFIG["spatial_merge_size"],
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_resize": True,
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
        },
    )


# ---------------------------------------------------------------------------------------------
# Generation of the whole fixture.


def versions():
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "generator": "apps/r1-sgg/scripts/qwen2_vl_fixture.py",
    }


def expand(ids, n_image):
    """The processor's placeholder expansion: one <|image_pad|> becomes n_image copies."""
    image_token = SPECIAL_IDS["<|image_pad|>"]
    out = []
    for t in ids:
        out.extend([image_token] * n_image if t == image_token else [t])
    return out


def encode_cases(processor, images):
    """Render, tokenize and expand both conversations; returns (cases.json entries, batch, labels)."""
    tokenizer = processor.tokenizer
    texts = [processor.apply_chat_template(messages(c, True), tokenize=False) for c in CASES]
    batch = processor(
        text=texts,
        images=[images[c["image"]] for c in CASES],
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    image_token = SPECIAL_IDS["<|image_pad|>"]
    # forward() rebuilds mm_token_type_ids from the ids; it is exactly the processor's.
    assert torch.equal(
        batch["mm_token_type_ids"], (batch["input_ids"] == image_token).to(batch["mm_token_type_ids"].dtype)
    )
    merge = processor.image_processor.merge_size**2
    labels = torch.full_like(batch["input_ids"], -100)
    entries = []
    for b, (case, text) in enumerate(zip(CASES, texts, strict=True)):
        prompt_text = processor.apply_chat_template(
            messages(case, False), tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        # The answer's tokens follow the prompt's unchanged and end with <|im_end|> "\n".
        assert text.startswith(prompt_text) and ids[: len(prompt_ids)] == prompt_ids
        assert ids[-2] == SPECIAL_IDS["<|im_end|>"] and tokenizer.decode(ids[-1:]) == "\n"
        answer_span = [len(prompt_ids), len(ids) - 1]  # answer tokens + <|im_end|>

        grid = batch["image_grid_thw"][b].tolist()
        n_image = math.prod(grid) // merge
        expanded = expand(ids, n_image)
        length = int(batch["attention_mask"][b].sum())
        assert batch["input_ids"][b, :length].tolist() == expanded
        assert ids.count(image_token) == 1
        shift = n_image - 1
        span_expanded = [answer_span[0] + shift, answer_span[1] + shift]
        labels[b, span_expanded[0] : span_expanded[1]] = batch["input_ids"][
            b, span_expanded[0] : span_expanded[1]
        ]

        entries.append(
            {
                "image": f"images/{case['image']}",
                "image_size_wh": list(images[case["image"]].size),
                "image_grid_thw": grid,
                "num_image_tokens": n_image,
                "messages": messages(case, True),
                "prompt_text": prompt_text,
                "text": text,
                "prompt_input_ids": prompt_ids,
                "input_ids": ids,
                "input_ids_expanded": expanded,
                "answer_span": answer_span,
                "answer_span_expanded": span_expanded,
            }
        )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    return entries, inputs, labels


def generate_fixture():
    out = FIXTURE_DIR
    (out / "images").mkdir(parents=True, exist_ok=True)
    for seed, (name, (w, h)) in enumerate(IMAGES.items()):
        make_image(w, h, seed).save(out / "images" / name)
    # Read back what is committed, so the references are computed from the PNG files themselves.
    images = {name: Image.open(out / "images" / name).convert("RGB") for name in IMAGES}

    processor = build_processor(build_tokenizer())
    ip = processor.image_processor
    entries, batch, labels = encode_cases(processor, images)

    # The resized uint8 images reproduce the processor's pixel_values exactly.
    resized = {name: resized_uint8(ip, images[name]) for name in IMAGES}
    manual = torch.cat([pixels_from_resized(ip, resized[c["image"]]) for c in CASES])
    assert torch.equal(manual, batch["pixel_values"]), "resize/normalize/patchify mismatch"

    # Greedy decoding continues case 0's prompt (its image is the batch's first one, so its
    # pixels are pixel_values[:n0] and its grid image_grid_thw[:1]; not stored twice).
    prompt = processor(
        text=[entries[0]["prompt_text"]], images=[images[CASES[0]["image"]]], return_tensors="pt"
    )
    prompt = {k: prompt[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    assert prompt["input_ids"][0].tolist() == expand(
        entries[0]["prompt_input_ids"], entries[0]["num_image_tokens"]
    )
    n0 = prompt["pixel_values"].shape[0]
    assert torch.equal(prompt["pixel_values"], batch["pixel_values"][:n0])
    assert torch.equal(prompt["image_grid_thw"], batch["image_grid_thw"][:1])

    meta = versions()
    margins = {}

    model = build_model(tied=False, seed=VARIANT_SEEDS["untied"])
    untied_dir = out / "untied"
    model.save_pretrained(untied_dir)
    processor.save_pretrained(untied_dir)
    position_ids, rope_deltas = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).long(),
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        batch_bf16 = dict(batch, pixel_values=batch["pixel_values"].to(torch.bfloat16))
        logits_bf16 = forward(model_bf16, batch_bf16).logits
    greedy_tokens, margins["untied"] = greedy(model, prompt)
    ref = {
        **batch,
        "resized_wide": torch.from_numpy(resized["wide.png"]),
        "resized_tall": torch.from_numpy(resized["tall.png"]),
        "position_ids": position_ids,
        "rope_deltas": rope_deltas,
        "vision_embeds": torch.cat(features.pooler_output),
        "labels": labels,
        **reference(model, batch, labels, tied=False),
        "logits_bf16": logits_bf16,
        "greedy_prompt_ids": prompt["input_ids"],
        "greedy_tokens": greedy_tokens,
    }
    save_reference(ref, out / "reference_untied.safetensors", meta)
    check_reload(untied_dir, model, batch, processor, images)

    tied = build_model(tied=True, seed=VARIANT_SEEDS["tied_hub"])
    hub_dir = out / "tied_hub"
    save_hub_layout(tied, processor.tokenizer, hub_dir)
    # Same tensor names as transformers' own save, less the tied head.
    hub_names = set(json.loads((hub_dir / "model.safetensors.index.json").read_text())["weight_map"])
    assert hub_names == set(load_file(untied_dir / "model.safetensors")) - {"lm_head.weight"}
    greedy_tokens, margins["tied_hub"] = greedy(tied, prompt)
    ref_tied = {**reference(tied, batch, labels, tied=True), "greedy_tokens": greedy_tokens}
    save_reference(ref_tied, out / "reference_tied_hub.safetensors", meta)
    check_reload(hub_dir, tied, batch, processor, images)

    write_json(
        out / "cases.json",
        {
            "versions": meta,
            "special_token_ids": SPECIAL_IDS,
            "min_pixels": MIN_PIXELS,
            "max_pixels": MAX_PIXELS,
            "padded_length": batch["input_ids"].shape[1],
            "cases": entries,
        },
    )
    summarize(ref, ref_tied, entries, margins)


def check_reload(model_dir, model, batch, processor, images):
    """transformers loads the written directory to the same weights, logits and inputs."""
    loaded, info = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(forward(loaded.eval(), batch).logits, forward(model, batch).logits), model_dir

    # The saved processor (forced onto the PIL backend: the config does not record it) gives
    # the same ids and pixels, so min/max pixels and the chat template made it to disk.
    image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    reloaded = AutoProcessor.from_pretrained(model_dir, image_processor=image_processor)
    assert type(reloaded.image_processor) is Qwen2VLImageProcessorPil
    texts = [reloaded.apply_chat_template(messages(c, True), tokenize=False) for c in CASES]
    again = reloaded(
        text=texts,
        images=[images[c["image"]] for c in CASES],
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(again[k], batch[k]), (model_dir, k)


def summarize(ref, ref_tied, entries, margins):
    t = ref["input_ids"].shape[1]
    print(f"T={t} N={ref['pixel_values'].shape[0]} M={ref['vision_embeds'].shape[0]}")
    print("image_grid_thw", ref["image_grid_thw"].tolist())
    print("lengths", ref["attention_mask"].sum(1).tolist())
    for name, r in (("untied", ref), ("tied_hub", ref_tied)):
        lg = r["logits"]
        print(
            f"{name}: loss {r['loss'].item():.6f} logits std {lg.std().item():.3f} range "
            f"[{lg.min().item():.2f}, {lg.max().item():.2f}] greedy {r['greedy_tokens'].tolist()} "
            f"min top-2 gap {margins[name]:.4f}"
        )
    print("bf16 max |diff|", (ref["logits_bf16"].float() - ref["logits"]).abs().max().item())
    for e in entries:
        print(
            e["image"],
            "ids",
            len(e["input_ids"]),
            "expanded",
            len(e["input_ids_expanded"]),
            "answer",
            e["answer_span_expanded"],
        )


# ---------------------------------------------------------------------------------------------
# Check mode.


def check_saved(model_dir, variant):
    inputs = load_file(FIXTURE_DIR / "reference_untied.safetensors")
    expected = load_file(FIXTURE_DIR / f"reference_{variant}.safetensors")["logits"]
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = forward(model, batch).logits
    diff = (logits - expected).abs().max().item()
    print(f"max |logit diff| vs reference_{variant}: {diff:.3e} (tolerance {CHECK_TOLERANCE:.0e})")
    return 0 if diff <= CHECK_TOLERANCE else 1


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check-saved", metavar="DIR", type=Path, help="checkpoint directory to compare")
    parser.add_argument("--variant", choices=sorted(VARIANT_SEEDS), default="untied")
    args = parser.parse_args()

    # One thread: reductions then run in a fixed order, so reruns are bit-identical.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    if args.check_saved is not None:
        return check_saved(args.check_saved, args.variant)
    generate_fixture()
    return 0


if __name__ == "__main__":
    sys.exit(main())
