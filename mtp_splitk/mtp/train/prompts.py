# Copyright © 2026 mtp_splitk contributors

"""Seed prompts for self-distillation, built combinatorially (no data set).

The target writes its own training text: each prompt is a short instruction,
question or task over a topic, in one of several styles, so the continuations
cover explanations, lists, stories, code, dialogue and so on. The combination
space (templates x topics x styles) is a few thousand strings;
:func:`prompts` shuffles it with a seed and splits it into a training part
and a disjoint held-out part.
"""

import random
from typing import List, Tuple

TEMPLATES = (
    "Explain {topic} {style}.",
    "What is the most common misconception about {topic}? Answer {style}.",
    "Write a short story that involves {topic}, {style}.",
    "Give me five practical tips about {topic}, {style}.",
    "Write a poem about {topic}.",
    "Summarize the history of {topic} {style}.",
    "What are the pros and cons of {topic}? Answer {style}.",
    "How would you teach {topic} to a beginner? Answer {style}.",
    "Write a dialogue between two friends arguing about {topic}.",
    "List three questions a student might ask about {topic}, then answer them.",
    "Write a Python function related to {topic} and explain it {style}.",
    "Compare {topic} with {other} {style}.",
    "Describe a typical day of someone who works with {topic}.",
    "Write an email to a colleague about {topic}, {style}.",
    "What would the world look like without {topic}? Answer {style}.",
    "Give a step-by-step guide to getting started with {topic}.",
    "Write a product description for something related to {topic}.",
    "What are the key terms one should know about {topic}? Define them {style}.",
    "Tell me a fun fact about {topic} and explain why it is true.",
    "Write a news headline and a short article about {topic}.",
    "Why do people care about {topic}? Answer {style}.",
    "Plan a one-week project about {topic}.",
    "Write a recipe-like set of instructions for understanding {topic}.",
    "Critique a popular opinion about {topic} {style}.",
)

TOPICS = (
    "photosynthesis",
    "black holes",
    "the French Revolution",
    "machine learning",
    "gardening",
    "climate change",
    "the stock market",
    "volcanoes",
    "chess",
    "the human immune system",
    "coffee",
    "electric cars",
    "ancient Rome",
    "prime numbers",
    "jazz music",
    "sleep",
    "the internet",
    "honeybees",
    "renewable energy",
    "the Moon landing",
    "baking bread",
    "recursion",
    "the water cycle",
    "democracy",
    "marathon running",
    "oceans",
    "vaccines",
    "the printing press",
    "databases",
    "friendship",
    "mountain climbing",
    "quantum computing",
    "dinosaurs",
    "public speaking",
    "the solar system",
    "cryptography",
    "meditation",
    "city planning",
    "birds",
    "the Renaissance",
    "budgeting",
    "earthquakes",
    "video games",
    "languages",
    "rainforests",
    "the theory of evolution",
    "sorting algorithms",
    "tea ceremonies",
    "space exploration",
    "recycling",
    "the human brain",
    "bicycles",
    "music theory",
    "fungi",
    "weather forecasting",
    "origami",
    "the Silk Road",
    "linear algebra",
    "volunteering",
    "trains",
)

STYLES = (
    "in simple terms",
    "to a ten-year-old",
    "in one paragraph",
    "in detail",
    "with an example",
    "as a list of bullet points",
    "like a friendly teacher",
    "in a formal tone",
)


def _combinations() -> List[str]:
    texts = []
    for t, template in enumerate(TEMPLATES):
        for i, topic in enumerate(TOPICS):
            other = TOPICS[(i * 7 + t + 1) % len(TOPICS)]
            if "{style}" in template:
                for style in STYLES:
                    texts.append(template.format(topic=topic, other=other, style=style))
            else:
                texts.append(template.format(topic=topic, other=other))
    return texts


#: The first prompts of the shuffled combinations are reserved for held-out
#: evaluation, so neither set shifts when the other's size changes.
HELD_OUT_POOL = 512


def prompts(
    num_train: int, num_eval: int, seed: int = 0
) -> Tuple[List[str], List[str]]:
    """``num_train`` training and ``num_eval`` held-out prompts, disjoint.

    Beyond the combination space the training prompts repeat (their
    continuations are sampled, so the text still differs).
    """
    texts = _combinations()
    random.Random(seed).shuffle(texts)
    if num_eval > HELD_OUT_POOL:
        raise ValueError(f"at most {HELD_OUT_POOL} held-out prompts; got {num_eval}")
    held_out, rest = texts[:num_eval], texts[HELD_OUT_POOL:]
    train = [rest[i % len(rest)] for i in range(num_train)]
    return train, held_out


def encode(tokenizer, text: str) -> List[int]:
    """A user turn in the tokenizer's chat template (plain text without one)."""
    if getattr(tokenizer, "has_chat_template", False):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )
        )
    return list(tokenizer.encode(text))
