"""Command-line options of sd-webui-perfusion (the WebUI imports this before parsing arguments)."""
import os


def preload(parser):
    from modules import paths

    parser.add_argument("--perfusion-dir", type=str, default=os.path.join(paths.models_path, "perfusion"),
                        help="Folder with Perfusion concept files (default: models/perfusion).")
    parser.add_argument("--perfusion-images-dir", type=str, default=os.path.join(paths.data_path, "perfusion-images"),
                        help="Folder(s), separated by the OS path separator, from which POST /perfusion/v1/train may "
                             "read training images given as server paths.")
