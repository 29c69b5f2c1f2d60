# Copyright © 2026 mtp_splitk contributors

"""The benchmark and tuning scripts, run from the repository root as
``python -m scripts.NAME`` (they import the installed ``mtp_splitk``)."""
