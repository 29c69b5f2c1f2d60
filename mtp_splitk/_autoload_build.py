# Copyright © 2026 mtp_splitk contributors

"""Build step that installs ``mtp_splitk_autoload.pth`` into site-packages.

setuptools loads this file by path (``[tool.setuptools.cmdclass]`` in
pyproject.toml) inside the isolated build environment, so it imports
setuptools only, never the package. The ``.pth`` file goes to the root of
the wheel, which installers put into site-packages:

- regular wheel (``pip install .``): the root of ``build_lib``;
- editable wheel (``pip install -e .``): setuptools links or redirects the
  packages to the checkout and drops other ``build_lib`` files, but writes
  the install command's output (its ``install_lib`` is the unpacked wheel)
  into the wheel as is, so the file goes there.
"""

import os

from setuptools.command.build_py import build_py as _build_py

PTH_NAME = "mtp_splitk_autoload.pth"
# A .pth line that starts with "import" is executed at start-up. It must stay
# one line, cheap when the variable is unset, and must not import mlx (see
# _autoload.py): it finds the package without importing it and runs
# _autoload.py by path, and does nothing where the package is gone (an
# editable install whose checkout moved leaves the .pth behind).
PTH_LINE = (
    "import os, importlib.util; s = os.environ.get('MTP_SPLITK') == '1' and "
    "importlib.util.find_spec('mtp_splitk'); s and __import__('runpy').run_path("
    "os.path.join(os.path.dirname(s.origin), '_autoload.py'))['install']()\n"
)


class build_py(_build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [os.path.join(self.build_lib, PTH_NAME)]
