"""The built-in corpus the simulator draws its answers from.

Plain sentences, so answers read like text; a few poems and code snippets for
the multi-line path; Chinese sentences for Chinese prompts. Everything is
split into tokens once, at import.
"""

from __future__ import annotations

from . import tokenizer

ENGLISH = (
    "That is a good question, and the short answer is that it depends on the details.",
    "Here is how I would think about it, step by step.",
    "First, make sure the basic setup works before adding anything clever.",
    "A small example usually explains more than a long description.",
    "It helps to measure before and after every change.",
    "Most problems become easier once they are split into smaller parts.",
    "The simplest approach is often the most reliable one.",
    "Keep in mind that the defaults are chosen to be safe, not fast.",
    "If something looks wrong, check the logs first.",
    "You can always start simple and refine the result later.",
    "In practice, a few clear rules work better than many vague ones.",
    "There are several ways to do this, each with its own trade-offs.",
    "The important part is to be consistent.",
    "Try it with a small input first, then scale it up.",
    "Good names make the rest of the work much easier.",
    "Writing a short test is the quickest way to be sure.",
    "When in doubt, read the documentation once more.",
    "The result should be easy to explain to someone else.",
    "I hope this gives you a useful starting point.",
    "Let me know if you would like more detail on any part.",
    "The weather is a fine example: it changes, but it follows patterns.",
    "A quiet morning and a cup of tea can solve many problems.",
    "Large language models predict text one token at a time.",
    "Streaming sends each token to the client as soon as it is ready.",
    "A gateway in front of the server can add keys, retries and limits.",
    "Retries are safe only before the first byte reaches the client.",
    "Every request should carry an id so that its logs can be found later.",
    "Caching works best when the same question is asked many times.",
    "Rivers find the easiest path to the sea, and so do good plans.",
    "Mountains look close in clear air, but the walk is always longer.",
    "Reading a little every day adds up to a great deal over a year.",
    "Cooking is mostly patience, heat and a pinch of salt.",
)

CHINESE = (
    "这是一个很好的问题，答案取决于具体情况。",
    "我们可以一步一步地来分析。",
    "首先，确保基本的设置可以正常工作。",
    "一个简单的例子往往比长篇的描述更清楚。",
    "每次修改前后都应该测量一下结果。",
    "把大问题拆成小问题，事情就会容易很多。",
    "最简单的方法往往也是最可靠的方法。",
    "如果发现问题，先看一看日志。",
    "希望这些内容对你有所帮助。",
    "如果需要更多细节，请随时告诉我。",
    "流式输出会在每个词生成后立即发送给客户端。",
    "清晨的一杯茶可以让人安静下来。",
)

POEMS = (
    (
        "The server hums beneath the stars,",
        "it answers every call;",
        "one token, then another comes,",
        "until it writes them all.",
    ),
    (
        "A river runs through quiet hills,",
        "the morning light is thin;",
        "the world is wide and full of words,",
        "and every day begins.",
    ),
    (
        "Small steps climb the longest stair,",
        "slow rain fills the sea;",
        "a patient mind, a gentle hand,",
        "is all it needs to be.",
    ),
)

CODE = (
    (
        "```python",
        "def greet(name: str) -> str:",
        '    return f"Hello, {name}!"',
        "",
        "",
        'print(greet("world"))',
        "```",
    ),
    (
        "```python",
        "def fibonacci(n: int) -> list[int]:",
        "    a, b = 0, 1",
        "    result = []",
        "    for _ in range(n):",
        "        result.append(a)",
        "        a, b = b, a + b",
        "    return result",
        "```",
    ),
    (
        "```python",
        "import json",
        "",
        'with open("data.json") as f:',
        "    data = json.load(f)",
        "print(len(data))",
        "```",
    ),
)

POEM_WORDS = ("poem", "poetry", "haiku", "verse", "rhyme", "sonnet", "诗")
CODE_WORDS = ("code", "function", "python", "script", "program", "snippet", "代码", "函数")


def _pieces(sentences: tuple[str, ...], sep: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(tokenizer.split(sep + s)) for s in sentences)


# Sentences as token tuples, each with the separator that follows the previous one.
ENGLISH_PIECES = _pieces(ENGLISH, " ")
CHINESE_PIECES = _pieces(CHINESE, "")
