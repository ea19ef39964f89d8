"""The cache of transformers' common tests outlives the virtual environment that built it: its link to the
installed transformers is mended on use."""

import os
from pathlib import Path

import transformers

from .transformers_common_suite import link_installed_transformers


def test_a_dangling_link_to_a_deleted_environment_is_replaced(tmp_path):
    (tmp_path / "src").mkdir()
    link = tmp_path / "src" / "transformers"
    link.symlink_to(tmp_path / "deleted-venv" / "transformers", target_is_directory=True)
    assert not link.exists()
    link_installed_transformers(tmp_path)
    installed = Path(transformers.__file__).parent
    assert Path(os.readlink(link)) == installed and (link / "__init__.py").is_file()
    link_installed_transformers(tmp_path)  # a link that is right is left as it is
    assert Path(os.readlink(link)) == installed and sorted(p.name for p in link.parent.iterdir()) == ["transformers"]
