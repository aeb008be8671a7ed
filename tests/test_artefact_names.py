"""Artefact file names are built from item ids in one place (the appendix listed `cell0058.png.png`)."""

from trustcase.checks import artefact_name


def test_an_items_artefact_is_named_after_its_id_without_a_doubled_extension():
    assert artefact_name("cell0058.png", ".png") == "cell0058.png"
    assert artefact_name("cell0058.png", ".npy") == "cell0058.npy"
    assert artefact_name("scans/Cell 7.TIF", ".png") == "scans_Cell_7.png"  # no folder, no space, no extension
    assert artefact_name("row-12", ".npy") == "row-12.npy"  # an id without extension is kept whole
    assert artefact_name("v1.2", ".png") == "v1.2.png"  # a dot that is not a file extension stays
    assert artefact_name(".png", ".png") == ".png.png"  # an id that is only an extension is not emptied
