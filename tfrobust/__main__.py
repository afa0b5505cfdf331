"""``python -m tfrobust`` runs the ``tfrobust`` command (see tfrobust/commands.py)."""

from tfrobust.commands import run

if __name__ == "__main__":
    run()
