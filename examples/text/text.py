"""Next-character prediction with a tiny LSTM: text data, token-id inputs, one device per paragraph.

The text, ``declaration.txt``, is the opening of the United States Declaration of Independence (1776,
public domain), transcribed for this example, so it runs offline. Each of its seven paragraphs is one
"writer": a natural partition with very unequal devices (the longest paragraph has about three times
the shortest's samples). A sample is 16 characters (lower-cased, as int64 ids) and its label the
character that follows; the last fifth of every paragraph is held out for testing, so no test window
overlaps a training window.

Run it (from the repository root) either way; both write runs/text/ with the usual report:

    PYTHONPATH=examples/text amble run examples/text/text.yaml
    python examples/text/text.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

TEXT = Path(__file__).with_name("declaration.txt")
WINDOW = 16
TEST_SHARE = 0.2


class CharLSTM(nn.Module):
    """Embedding -> one LSTM layer -> the next character's logits, from the last position's state."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, embed: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed)  # the labels are characters too: one vocabulary
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(tokens))  # (B, WINDOW, hidden)
        logits: torch.Tensor = self.out(states[:, -1])  # (B, num_classes)
        return logits


def make_lstm(input_shape: tuple[int, ...], num_classes: int, embed: int = 16, hidden: int = 64) -> nn.Module:
    """The model factory the config names: AMBLE calls it with ``(WINDOW,)`` and the vocabulary's size."""
    return CharLSTM(input_shape, num_classes, embed, hidden)


def load_declaration() -> dict[str, npt.NDArray[np.int64]]:
    """Windows of ``WINDOW`` character ids, the next character's id, and each training window's paragraph."""
    paragraphs = [p.strip().lower() for p in TEXT.read_text().split("\n\n") if p.strip()]
    vocabulary = sorted(set("".join(paragraphs)))
    ids = {char: index for index, char in enumerate(vocabulary)}
    arrays: dict[str, list[npt.NDArray[np.int64]]] = {key: [] for key in ("x_train", "y_train", "owner_train")}
    arrays |= {"x_test": [], "y_test": []}
    for owner, paragraph in enumerate(paragraphs):
        encoded = np.array([ids[char] for char in paragraph], dtype=np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(encoded[:-1], WINDOW)  # (len - WINDOW, WINDOW)
        targets = encoded[WINDOW:]
        cut = int(len(targets) * (1 - TEST_SHARE))
        test_from = cut + WINDOW  # the first test window starts after the last training target
        arrays["x_train"].append(windows[:cut])
        arrays["y_train"].append(targets[:cut])
        arrays["owner_train"].append(np.full(cut, owner, dtype=np.int64))
        arrays["x_test"].append(windows[test_from:])
        arrays["y_test"].append(targets[test_from:])
    result = {key: np.concatenate(parts) for key, parts in arrays.items()}
    result["num_classes"] = np.array(len(vocabulary), dtype=np.int64)
    return result


if __name__ == "__main__":
    import amble

    result = amble.run(Path(__file__).with_name("text.yaml"), progress=True)
    for label, numbers in result.strategies.items():
        final, virtual_s = numbers["final_accuracy"], numbers["virtual_time_s"]
        print(f"{label:>10}: final accuracy {final:.3f}, virtual time {virtual_s:.1f} s")
    print(f"report: {result.report}")
