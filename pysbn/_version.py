# SPDX-License-Identifier: MIT
# The one place of the version: pysbn.__version__, the wheel's metadata (scikit-build-core's
# regex provider, pyproject.toml) and the native core's version() (CMakeLists.txt reads it).
__version__ = "0.2.0"
