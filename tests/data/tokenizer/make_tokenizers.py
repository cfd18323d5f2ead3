#!/usr/bin/env python3
"""Trains the two small byte-level BPE tokenizers that tests/test_tokenizer.cpp reads, and records
the ids the Hugging Face `tokenizers` library produces for a set of edge-case strings.

Tooling only: `pip install tokenizers` (tested with 0.23.3). The build and the tests never run
Python; they read the committed outputs:
  gpt2_style.json    ByteLevel pre-tokenizer (GPT-2 regex), ByteLevel post-processor/decoder
  llama3_style.json  Sequence[Split(Llama-3 regex), ByteLevel(use_regex=False)], BOS template,
                     ignore_merges
  qwen2_style.json   Sequence[Split(Qwen2 regex), ByteLevel(use_regex=False)] (no NFC normalizer)
  smollm_style.json  Sequence[Digits(individual_digits), ByteLevel(use_regex=True)]
  cases.json         {"tokenizers": {name: {"file", "vocab_size", "add_prefix_space"?}},
                      "cases": [{"text": ..., name: [ids], name + "_special": [ids]}]}
                     (name + "_special": encode(add_special_tokens=True), present where it differs;
                     "split_gpt2" / "split_llama3" / "split_qwen2": the pieces of each split regex),
                      "split_cases": [...] random strings over all of Unicode, pieces only}
                     "gpt2_prefix" is gpt2_style.json with ByteLevel add_prefix_space=true.
The cases are hand-written edge cases plus seeded random strings over an alphabet of the
characters the split patterns treat differently.

Run from anywhere: python3 make_tokenizers.py  (writes beside this script).
"""
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A few KB of text: enough merges for a ~500-token vocabulary, with the non-ASCII scripts the cases use.
CORPUS = """
The quick brown fox jumps over the lazy dog. It's a sentence we've all seen, and I'll use it again.
Low-rank adaptation freezes the base weights and learns two small matrices per layer; QLoRA stores
the frozen base in 4-bit NormalFloat blocks of 64 values, each with its own absmax scale.
A tokenizer turns text into integers: bytes first, then merges learned from a corpus, lowest rank first.
In 2023, researchers fine-tuned a 65B model on a single 48 GB GPU. Numbers like 3.14159, 1,000,000
and 42 appear often; so do dates (2024-05-17), times (12:30), and prices ($19.99, 5%).
She said: "Don't stop!" -- he replied, 'We can't, we're late.' They'd known; you'd have guessed.
Punctuation runs!!! ??? ... --- *** ### @@@ and symbols like <tag>, {braces}, [brackets], (parens).
Café, naïve, résumé, façade, über, Müller, Straße, Ångström, jalapeño, crème brûlée, déjà vu.
中文分词很有趣。我们今天学习机器学习和自然语言处理。你好，世界！
日本語のテキストも少し。こんにちは世界。Русский текст: привет, мир! Ελληνικά: γειά σου κόσμε.
Emoji: 😀 🎉 👍🏽 ❤️ 🚀 and flags 🇫🇷 🇯🇵 mixed with words like fun😀times.
Code: def forward(x): return x @ W.T + (x @ A.T) @ B.T * scale  # LoRA update
	Tabs	and  double  spaces   and trailing spaces   
Newlines


and carriage returns\r\nin Windows text.\r\n
""" * 3

CASES = [
    "",
    " ",
    "  ",
    "   leading spaces",
    "trailing spaces   ",
    "\n",
    "\n\n\n",
    "line one\nline two\r\nline three",
    "\t\ttabs\tinside",
    "hello",
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "It's I'm you're we've they'll he'd IT'S WE'VE",
    "don't can't won't",
    "1234567890",
    "3.14159 and 1,000,000 and 42",
    "year 2024-05-17 at 12:30",
    "!!!???...---",
    "a,b;c:d!e?f",
    "<tag attr=\"x\">{[()]}</tag>",
    "Café naïve résumé",
    "Straße Müller über",
    "中文分词很有趣",
    "你好，世界！",
    "こんにちは世界",
    "привет, мир",
    "γειά σου κόσμε",
    "😀",
    "👍🏽 🚀🚀",
    "🇫🇷🇯🇵",
    "fun😀times",
    "mixed 中文 and English 123 😀!",
    "x @ A.T @ B.T * scale  # LoRA",
    "def f(x):\n    return x + 1\n",
    "spaces    between    words",
    "end with newline\n",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "a<|endoftext|> b",
    "<|endoftext|><|endoftext|>x<|endoftext|>",
    "<|begin_of_text|>hi<|end_of_text|> <|im_start|>user\n<|im_end|>",
    "ſ K Ⅻ ½ ²",
    "it'ſt IT'Ll we'RE 'x '",
    "a\u0301b combining",
    "x\u3000\u3000y \u2028a a\u0085b",
    "\r\n\r\n  \n \t\n",
    "12345 678 9 1234567",
    "٣٤٥ ①②③ ⅷ",
]


def random_cases(count, seed=1234):
    """Strings over characters each pattern classes differently: letters (ASCII, Latin-1, CJK, a
    long s), digits and other numbers, apostrophes and contraction letters, punctuation, combining
    marks, emoji, and every kind of whitespace."""
    import random

    rng = random.Random(seed)
    alphabet = (
        list("abcdeSTLMRVD") + ["é", "ü", "中", "文", "ſ", "Ж"] + list("0123456789") + ["½", "Ⅻ", "٣"]
        + ["'"] * 4 + list(".,!?-_()<>@#$%*") + ["\u0301", "😀", "🎉", "👍🏽"]
        + [" "] * 8 + ["\t", "\n", "\r", "\u00a0", "\u3000", "\u2028", "\u0085", "\x0b"]
    )
    out = []
    for _ in range(count):
        n = rng.randint(1, 24)
        out.append("".join(rng.choice(alphabet) for _ in range(n)))
    return out


def wide_random_cases(count, seed=7):
    """Short strings mixing contraction material with code points drawn from all of Unicode, for the
    split patterns alone: they check the letter / number tables against the library's engine."""
    import random

    rng = random.Random(seed)
    base = list(" \t\n\r'sStTdDlLmMrReEvV0123456789.,!-")
    out = []
    for _ in range(count):
        s = ""
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.5:
                s += rng.choice(base)
            else:
                s += chr(rng.choice([rng.randint(0x80, 0x3000), rng.randint(0x3000, 0xD7FF), rng.randint(0xE000, 0x2FFFF)]))
        out.append(s)
    return out


def train(pre_tokenizer, special, vocab_size, corpus=CORPUS):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    return tok


def main():
    gpt2 = train(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"], 500)
    gpt2.post_processor = processors.ByteLevel(trim_offsets=True)

    llama3 = train(
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
        ["<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>"],
        600,
    )
    # Llama-3's own file sets ignore_merges (a pre-token found whole in the vocabulary is one token);
    # the trainer has no option for it, so it is set in the JSON.
    cfg = json.loads(llama3.to_str())
    cfg["model"]["ignore_merges"] = True
    llama3 = Tokenizer.from_str(json.dumps(cfg))
    llama3.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", llama3.token_to_id("<|begin_of_text|>"))],
    )

    # Smaller: these two exist for their pre-tokenizers, not their merges.
    qwen2 = train(
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
        ["<|endoftext|>"],
        320,
        CORPUS[: len(CORPUS) // 3],
    )
    smollm = train(
        pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        320,
        CORPUS[: len(CORPUS) // 3],
    )

    files = {"gpt2_style": gpt2, "llama3_style": llama3, "qwen2_style": qwen2, "smollm_style": smollm}
    meta = {}
    for name, tok in files.items():
        path = os.path.join(HERE, name + ".json")
        tok.save(path)
        print(path, os.path.getsize(path), "bytes, vocab", tok.get_vocab_size())
        meta[name] = {"file": name + ".json", "vocab_size": tok.get_vocab_size()}

    # GPT-2's own file has add_prefix_space=false; the option is tested on the same vocabulary.
    cfg = json.loads(gpt2.to_str())
    cfg["pre_tokenizer"]["add_prefix_space"] = True
    tokenizers = dict(files, gpt2_prefix=Tokenizer.from_str(json.dumps(cfg)))
    meta["gpt2_prefix"] = {"file": "gpt2_style.json", "vocab_size": gpt2.get_vocab_size(), "add_prefix_space": True}

    # The split patterns alone, so the matchers are checked piece by piece, not only through merges
    # (which can hide a wrong boundary).
    splitters = {
        name: pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        for name, pattern in (("gpt2", GPT2_PATTERN), ("llama3", LLAMA3_PATTERN), ("qwen2", QWEN2_PATTERN))
    }

    cases = []
    for text in CASES + random_cases(100):
        entry = {"text": text}
        for name, splitter in splitters.items():
            entry["split_" + name] = [piece for piece, _ in splitter.pre_tokenize_str(text)]
        for name, tok in tokenizers.items():
            enc = tok.encode(text, add_special_tokens=False)
            entry[name] = enc.ids
            special = tok.encode(text, add_special_tokens=True).ids
            if special != enc.ids:  # only where the post-processor adds something
                entry[name + "_special"] = special
            if name != "gpt2_prefix":
                assert tok.decode(enc.ids, skip_special_tokens=False) == text, (name, text)
        cases.append(entry)
    split_cases = []
    for text in wide_random_cases(150):
        entry = {"text": text}
        for name, splitter in splitters.items():
            entry["split_" + name] = [piece for piece, _ in splitter.pre_tokenize_str(text)]
        split_cases.append(entry)

    # One case per line keeps the file small and diffable.
    def lines(entries):
        return ",\n".join("  " + json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in entries)

    with open(os.path.join(HERE, "cases.json"), "w", encoding="utf-8") as f:
        f.write('{"tokenizers": ' + json.dumps(meta, ensure_ascii=False) + ',\n "cases": [\n')
        f.write(lines(cases))
        f.write('\n],\n "split_cases": [\n')
        f.write(lines(split_cases))
        f.write("\n]}\n")


def unicode_table():
    """Prints the letter / number ranges of include/qlora/text/unicode_tables.hpp (python3
    make_tokenizers.py --unicode-table). The classes are read from the library's own regex engine
    (Oniguruma, through a Split on \\p{L} / \\p{N}), so they are exactly what its patterns use,
    whatever Unicode version Python's unicodedata has."""
    import sys

    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(chr(c) for c in cps)

    def members(pattern):
        inside = [True] * len(cps)
        # behavior="removed" drops the matches; what is left (by code-point offsets) is outside the class.
        for _, (a, b) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text):
            for i in range(a, b):
                inside[i] = False
        return [cps[i] for i in range(len(cps)) if inside[i]]

    def ranges(members_):
        out = []
        for cp in members_:
            if out and out[-1][1] == cp - 1:
                out[-1][1] = cp
            else:
                out.append([cp, cp])
        return out

    print("// From the regex engine of tokenizers", __import__("tokenizers").__version__)
    for name, pattern in (("kLetterRanges", r"\p{L}"), ("kNumberRanges", r"\p{N}")):
        r = ranges(members(pattern))
        print(f"inline constexpr CodeRange {name}[] = {{")
        line = " "
        for a, b in r:
            item = f" {{0x{a:X}, 0x{b:X}}},"
            if len(line) + len(item) > 110:
                print(line)
                line = " "
            line += item
        print(line)
        print("};")
    sys.exit(0)


if __name__ == "__main__":
    import sys

    if "--unicode-table" in sys.argv:
        unicode_table()
    main()
