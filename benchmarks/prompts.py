"""Built-in prompts that ask for long answers, so every reply runs to ``max_tokens``.

A request's prompt depends only on the seed and the request's number, so two runs with the same
options send the same prompts in the same order whatever the server or the timing.
"""

from __future__ import annotations

import random

PROMPTS: tuple[str, ...] = (
    "Write a detailed essay about the history of the printing press and its effect on Europe.",
    "Write a detailed essay about how rivers shape the landscapes they flow through.",
    "Write a detailed essay about the causes and consequences of the industrial revolution.",
    "Write a detailed essay about the role of bees in agriculture and what threatens them.",
    "Write a detailed essay about the invention of the telephone and how it changed daily life.",
    "Write a detailed essay about why cities grow near coasts and rivers.",
    "Write a detailed essay about the life cycle of a star, from nebula to remnant.",
    "Write a detailed essay about the history of mathematics in ancient Greece.",
    "Explain step by step how a bill becomes a law in a parliamentary democracy.",
    "Explain step by step how bread dough rises and what happens in the oven.",
    "Explain step by step how a computer boots, from pressing the power button to the login screen.",
    "Explain step by step how vaccines train the immune system.",
    "Explain step by step how to plan a vegetable garden for a small backyard.",
    "Explain step by step how an airplane wing produces lift.",
    "Explain step by step how a web browser loads and displays a web page.",
    "Explain step by step how photosynthesis turns light into sugar.",
    "Describe in detail a day in the life of a lighthouse keeper in the nineteenth century.",
    "Describe in detail how the water cycle works and why it matters for climate.",
    "Give a thorough guide to learning a new language as an adult, with practical advice.",
    "Give a thorough comparison of trains, buses and cars for travel between cities.",
    "Tell a long story about a young inventor who builds a machine that talks to birds.",
    "Tell a long story about a sailor who discovers an island that appears only at night.",
    "List and explain twenty tips for writing clear and readable computer programs.",
    "List and explain the main events of the Apollo space program in order.",
)


def prompt_for(request_index: int, seed: int = 0) -> str:
    """The prompt of request number ``request_index`` (warm-up requests use negative numbers)."""
    rng = random.Random(f"{seed}:{request_index}")
    return PROMPTS[rng.randrange(len(PROMPTS))]
