"""Command-line flags: every long flag of every ViTReg command takes dashes or underscores."""


def spellings(flag: str) -> list[str]:
    """`--output-dir` -> `["--output-dir", "--output_dir"]`, to unpack into `add_argument`."""
    return list(dict.fromkeys([flag, flag[:2] + flag[2:].replace("_", "-"), flag[:2] + flag[2:].replace("-", "_")]))
