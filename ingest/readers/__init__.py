"""Built-in imaging readers; importing this package registers them."""

from . import dicom, image2d, itk  # noqa: F401
