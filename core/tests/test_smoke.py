import curvprune


def test_import():
    assert curvprune.__version__
