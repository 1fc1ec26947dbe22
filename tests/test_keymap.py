"""The key map: loading, validation, the saved form and its hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlacl.data.keymap import KeyMap, load_keymap
from vlacl.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "keymaps").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_keymaps_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    keymap = load_keymap(path)
    assert not keymap.is_default
    saved = tmp_path / "keymap.yaml"
    saved.write_text(keymap.to_yaml())
    again = load_keymap(saved)
    assert again == keymap
    assert again.sha256() == keymap.sha256()


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"libero.yaml", "mobile-flat.yaml"}


def test_default_and_hash_distinguish() -> None:
    assert load_keymap(None).is_default
    assert KeyMap().sha256() != KeyMap(action="actions").sha256()
    assert KeyMap(cameras={"a": "x", "b": "y"}).sha256() == KeyMap(cameras={"a": "x", "b": "y"}).sha256()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("actoin: actions\n", "did you mean `action`"),
        ("state: []\n", "at least one key"),
        ("cameras: {front.left: images}\n", "camera name 'front.left'"),
        ("flip_images: maybe\n", "flip_images"),
    ],
)
def test_bad_keymap_is_one_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keymap.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_keymap(path)
