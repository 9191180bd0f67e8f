"""The datasets this project knows: four IDX files each, with checksums pinned here.

Every SHA-256 is of a file's uncompressed content, never of a gzip wrapper: the same content
gzipped by anyone (Debian recompresses Fashion-MNIST, for one) or not gzipped at all is the same
file, and anything else is refused by name. The Fashion-MNIST values agree with the MD5s of the
uncompressed files that the official release publishes.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGES, LABELS = "images", "labels"


@dataclass(frozen=True)
class FileSpec:
    role: str  # train_images, train_labels, test_images, test_labels
    filename: str  # canonical name, without .gz
    kind: str  # IMAGES or LABELS
    count: int
    sha256: str  # of the uncompressed content


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[FileSpec, ...]
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    train_size: int = 50_000  # the first 50,000 official training samples; the rest is validation

    def file(self, role: str) -> FileSpec:
        return next(f for f in self.files if f.role == role)


def _four_files(shas: dict[str, str]) -> tuple[FileSpec, ...]:
    layout = [
        ("train_images", "train-images-idx3-ubyte", IMAGES, 60_000),
        ("train_labels", "train-labels-idx1-ubyte", LABELS, 60_000),
        ("test_images", "t10k-images-idx3-ubyte", IMAGES, 10_000),
        ("test_labels", "t10k-labels-idx1-ubyte", LABELS, 10_000),
    ]
    return tuple(
        FileSpec(role, name, kind, count, sha256=shas[role])
        for role, name, kind, count in layout
    )


def _torchvision_mirrors(class_name: str) -> tuple[str, ...]:
    # torchvision keeps the list of live mirrors up to date; we use its list and its downloader.
    import torchvision.datasets

    return tuple(getattr(torchvision.datasets, class_name).mirrors)


MNIST = DatasetSpec(
    name="mnist",
    files=_four_files(
        {
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
    mirrors=(),  # filled from torchvision on use: see mirrors_for()
    classes=tuple(str(d) for d in range(10)),
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    files=_four_files(
        {
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    ),
    mirrors=(),
    classes=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
)

DATASETS = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}") from None


def fingerprint(spec: DatasetSpec) -> str:
    """A digest of what the spec pins: stable for a dataset before any byte of it is read."""
    import hashlib

    pins = "".join(f"{f.role} {f.sha256}\n" for f in spec.files)
    return hashlib.sha256(f"{spec.name}\n{spec.train_size}\n{pins}".encode()).hexdigest()


def mirrors_for(spec: DatasetSpec) -> tuple[str, ...]:
    if spec.mirrors:
        return spec.mirrors
    return _torchvision_mirrors(_TORCHVISION_CLASS[spec.name])
