"""Forgetting probes: 100 general-capability questions with checkable answers, in four categories.

Run on base and tuned after every fine-tune: a drop here means the tuning cost general ability that the
task metrics do not show. Each probe is scored by `check`: the answer must equal (exact), appear in
(contains), or match (regex) what is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunelab.eval.metrics import normalize_answer


@dataclass(frozen=True)
class Probe:
    id: str
    category: str
    prompt: str
    answer: str
    check: str = "contains"  # exact | contains | regex | number
    case_sensitive: bool = False  # regex: for the probes that ask for capitals or lower case
    operands: tuple[int, ...] = ()  # number: the question's own numbers, which an answer often repeats

    def passed(self, output: str) -> bool:
        if self.check == "exact":
            return normalize_answer(output) == normalize_answer(self.answer)
        if self.check == "regex":
            return re.search(self.answer, output, flags=re.S | (0 if self.case_sensitive else re.I)) is not None
        if self.check == "number":
            # The result as a whole number (not inside 2.333 or 190), beyond the times the question's own numbers
            # account for: "81 divided by 9 is 8" restates a 9 but does not answer 9.
            said = len(_numbers(self.answer, output))
            others = [str(n) for n in self.operands if str(n) != self.answer]
            restated = bool(others) and all(_numbers(n, output) for n in others)
            return said > (sum(1 for n in self.operands if str(n) == self.answer) if restated else 0)
        return normalize_answer(self.answer) in normalize_answer(output)


_ARITHMETIC = [(3, 4, "+"), (12, 7, "+"), (25, 17, "+"), (9, 6, "-"), (40, 15, "-"), (6, 7, "*"), (8, 9, "*"),
               (100, 45, "-"), (11, 11, "+"), (5, 5, "*"), (72, 8, "/"), (81, 9, "/"), (14, 3, "*"),
               (50, 50, "+"), (33, 11, "/"), (7, 8, "+"), (90, 30, "-"), (4, 25, "*"), (18, 2, "/"), (63, 37, "+"),
               (15, 4, "*"), (99, 9, "/"), (120, 20, "-"), (2, 10, "*"), (16, 16, "+")]
_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}

_FACTS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of Egypt?", "Cairo"),
    ("How many days are in a week?", "seven|7"), ("How many legs does a spider have?", "eight|8"),
    ("What is the largest planet in our solar system?", "Jupiter"), ("What planet is known as the Red Planet?", "Mars"),
    ("What gas do plants absorb from the air?", "carbon dioxide|CO2"), ("What is frozen water called?", "ice"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What color is the sky on a clear day?", "blue"),
    ("How many continents are there on Earth?", "seven|7"), ("What is the chemical symbol for gold?", "Au"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the boiling point of water in Celsius?", "100"),
    ("How many hours are in a day?", "24|twenty-four"), ("What is the opposite of hot?", "cold"),
    ("What do bees make?", "honey"), ("What is the tallest animal in the world?", "giraffe"),
    ("How many months are in a year?", "twelve|12"), ("What is the closest star to Earth?", "sun"),
    ("In which ocean is Hawaii?", "Pacific"),
]

_INSTRUCTIONS = [
    ("Reply with only the word yes.", "yes", "exact"), ("Reply with only the word no.", "no", "exact"),
    ("Say the word banana and nothing else.", "banana", "exact"),
    ("Repeat exactly: the cat sat on the mat", "the cat sat on the mat", "contains"),
    ("Write the word hello in capital letters.", r"\bHELLO\b", "regex"),
    ("Answer with a single digit: how many sides does a triangle have?", r"^\s*3\s*\.?\s*$", "regex"),
    ("Give me a word that rhymes with cat.", r"\b(bat|hat|mat|rat|sat|fat|pat|vat|chat|flat|that)\b", "regex"),
    ("Spell the word dog backwards.", "god", "contains"), ("What is the first letter of the alphabet?", r"\ba\b", "regex"),
    ("Write the number ten using digits.", r"\b10\b", "regex"),
    ("Name one primary color.", r"\b(red|blue|yellow)\b", "regex"),
    ("Translate 'thank you' into French.", "merci", "contains"),
    ("Translate 'hello' into Spanish.", "hola", "contains"),
    ("Write a sentence that contains the word apple.", r"\bapple\b", "regex"),
    ("Count from one to three using digits separated by spaces.", r"1\s+2\s+3", "regex"),
    ("Respond with the word done in lowercase.", r"^\W*done\W*$", "regex"),
    ("What is the plural of mouse?", "mice", "contains"),
    ("What is the past tense of run?", "ran", "contains"),
    ("Which is bigger, an elephant or a mouse? Answer with one word.", "elephant", "contains"),
    ("Is the sun hot or cold? Answer with one word.", "hot", "contains"),
    ("Name a fruit that is yellow.", r"\b(banana|lemon|pineapple|mango)s?\b", "regex"),
    ("Write the word water in uppercase.", r"\bWATER\b", "regex"),
    ("Finish the sentence: The early bird catches the", "worm", "contains"),
    ("What comes after Monday?", "tuesday", "contains"),
    ("Answer true or false: the earth is flat.", "false", "contains"),
]

_FORMATS = [
    ("List the numbers 1 to 5 separated by commas.", r"1\s*,\s*2\s*,\s*3\s*,\s*4\s*,\s*5"),
    ('Return a JSON object with a key "name" whose value is "Ada".', r'\{\s*"name"\s*:\s*"Ada"\s*\}'),
    ("Return a JSON array of the numbers 1, 2 and 3.", r"\[\s*1\s*,\s*2\s*,\s*3\s*\]"),
    ("Write three colors as a bulleted list using dashes.", r"(^|\n)\s*-\s*\w+.*\n\s*-\s*\w+.*\n\s*-\s*\w+"),
    ("Write two animal names, one per line.", r"\w+\s*\n\s*\w+"),
    ("Give the date 4 July 2021 in the format YYYY-MM-DD.", r"2021-07-04"),
    ("Write the word cat in quotation marks.", r'"cat"'),
    ("Answer in exactly one word: what color is grass?", r"^\W*green\W*$"),
    ("Write the letters a, b and c separated by semicolons.", r"a\s*;\s*b\s*;\s*c"),
    ("Put the word hello inside square brackets.", r"\[\s*hello\s*\]"),
    ("Write a markdown heading that says Title.", r"^\s*#+\s*Title"),
    ("Write the number five as a digit followed by a period.", r"\b5\."),
    ("Return the word yes as a JSON string.", r'^\s*"yes"\s*$'),
    ("Write the numbers 3, 2, 1 in that order separated by spaces.", r"3\s+2\s+1"),
    ('Return a JSON object with keys "a" and "b" both set to 1.', r'\{\s*"a"\s*:\s*1\s*,\s*"b"\s*:\s*1\s*\}'),
    ("Write the word stop followed by an exclamation mark.", r"stop!"),
    ("Write the time half past three in 24-hour HH:MM format, afternoon.", r"15:30"),
    ("Write the word python in lowercase letters only.", r"^\W*python\W*$"),
    ("Write three numbers separated by the pipe character |.", r"\d+\s*\|\s*\d+\s*\|\s*\d+"),
    ("Answer with an uppercase letter only: what letter does apple start with?", r"^\W*A\W*$"),
    ("Write the words red and blue joined by a hyphen.", r"red-blue"),
    ("Write an email address for a user named bob at example.com.", r"bob@example\.com"),
    ("Write the number one hundred in digits.", r"\b100\b"),
    ("Put the word end in parentheses.", r"\(\s*end\s*\)"),
    ('Write a key-value pair in the form key=value with key "x" and value 5.', r"x\s*=\s*5"),
]


def _numbers(number: str, text: str) -> list[str]:
    """`number` as a whole number in `text` (not inside 2.333 or 190)."""
    return re.findall(rf"(?<![\d.]){number}(?![\d])(?!\.\d)", text)


# The probes whose question is about letter case: scored case-sensitively ("hello" does not write HELLO).
_CASE = {"Write the word hello in capital letters.", "Write the word water in uppercase.",
         "Respond with the word done in lowercase.", "Write the word python in lowercase letters only.",
         "Answer with an uppercase letter only: what letter does apple start with?"}


def _arithmetic() -> list[Probe]:
    out = []
    for i, (a, b, op) in enumerate(_ARITHMETIC):
        result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        out.append(Probe(f"arith-{i:02d}", "arithmetic", f"What is {a} {_WORDS[op]} {b}? Answer with the number.",
                         str(result), "number", operands=(a, b)))
    return out


PROBES: list[Probe] = [
    *_arithmetic(),
    *[Probe(f"fact-{i:02d}", "facts", q, rf"\b({a})\b", "regex") for i, (q, a) in enumerate(_FACTS)],
    *[Probe(f"instr-{i:02d}", "instructions", q, a, c, case_sensitive=q in _CASE)
      for i, (q, a, c) in enumerate(_INSTRUCTIONS)],
    *[Probe(f"format-{i:02d}", "formats", q, a, "regex", case_sensitive=q in _CASE)
      for i, (q, a) in enumerate(_FORMATS)],
]
CATEGORIES = ("arithmetic", "facts", "instructions", "formats")
