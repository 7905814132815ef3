import pytest

from fmri_data.errors import RecipeError
from fmri_data.config.recipe import available_recipes, load_recipe, parse_override, recipe_hash


def test_every_bundled_recipe_resolves_and_validates():
    names = available_recipes()
    assert {"default", "neurostorm", "brain_jepa", "fmri_lm", "brainlm"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe["name"] == name
        assert "extends" not in recipe


def test_model_family_settings():
    neurostorm = load_recipe("neurostorm")
    assert neurostorm["temporal"]["tr"] == 0.8
    assert neurostorm["volume"]["shape"] == [96, 96, 96]
    assert neurostorm["volume"]["normalization"] == "global_zscore"
    assert neurostorm["store"]["chunk_frames"] == 20
    for name, tr, atlas in (("brain_jepa", None, "tian_s3+schaefer400_17n"), ("fmri_lm", 2.0, "tian_s3+schaefer400_7n")):
        recipe = load_recipe(name)
        assert recipe["temporal"]["tr"] == tr
        assert recipe["roi"]["atlases"] == [atlas]
        assert recipe["volume"] is None


def test_overrides_apply_and_change_the_hash():
    base = load_recipe("default")
    changed = load_recipe("default", ["temporal.tr=2.0", "roi.atlases=[a424]"])
    assert changed["temporal"]["tr"] == 2.0 and changed["roi"]["atlases"] == ["a424"]
    assert recipe_hash(base) != recipe_hash(changed)
    assert recipe_hash(base) == recipe_hash(load_recipe("default"))


@pytest.mark.parametrize(
    "override, message",
    [
        (["temporal.tr=-1"], "temporal.tr"),
        (["volume.normalization=zzz"], "volume.normalization"),
        (["store.chunk_frames=0"], "store.chunk_frames"),
        (["bogus=1"], "bogus"),
    ],
)
def test_invalid_recipes_are_refused_with_the_key(override, message):
    with pytest.raises(RecipeError, match=message.split(".")[0]):
        load_recipe("default", override)


def test_unknown_recipe_and_bad_override():
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("no-such-recipe")
    with pytest.raises(RecipeError, match="key.path=value"):
        parse_override("temporal.tr")


def test_recipe_file_with_extends(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nextends: neurostorm\ntemporal: {tr: 1.0}\n")
    recipe = load_recipe(path)
    assert recipe["temporal"]["tr"] == 1.0 and recipe["volume"]["shape"] == [96, 96, 96]


def test_recipe_names_are_not_shadowed_by_folders_or_files(tmp_path, monkeypatch):
    """A folder (or extensionless file) named like a bundled recipe in the working directory
    does not replace the bundled recipe; a path must look like a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "brainlm").mkdir()
    (tmp_path / "fmri_lm").write_text("name: mine\n")
    assert load_recipe("brainlm")["name"] == "brainlm"
    assert load_recipe("fmri_lm")["name"] == "fmri_lm"
    (tmp_path / "mine").write_text("name: mine\nextends: default\n")
    with pytest.raises(RecipeError, match=r"write \./mine"):
        load_recipe("mine")
    assert load_recipe("./mine")["name"] == "mine"
