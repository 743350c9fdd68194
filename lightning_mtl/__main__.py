"""``python -m lightning_mtl {fit,validate,test,predict} ...`` (the Lightning CLI) and
``python -m lightning_mtl report RUN_DIR ...`` (tables and a chart of finished runs)."""

import sys

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from lightning_mtl.report import main as report_main

        report_main(sys.argv[2:])
    else:
        from lightning_mtl.cli import main

        main()
