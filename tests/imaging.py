"""Fixture builders for image files in every supported format (tests build their own data)."""

import io

import numpy as np
from PIL import Image


def gradient(height: int, width: int, max_value: int = 255) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((x + y) / (height + width - 2) * max_value).astype(
        np.uint16 if max_value > 255 else np.uint8
    )


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(
    array: np.ndarray,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    voi_function: str | None = None,
    voi_lut: np.ndarray | None = None,
) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:  # one VOI LUT: entry i is the output for input value i
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, bits_stored]
        item.add_new(0x00283006, "OW", np.asarray(voi_lut, dtype="<u2").tobytes())  # LUTData
        ds.VOILUTSequence = [item]
    ds.PixelData = array.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's header:
    a decoder that trusts it would allocate width * height bytes)."""
    import struct
    import zlib

    data = bytearray(png_bytes(np.zeros((8, 8), dtype=np.uint8)))
    # Bytes 8..33: IHDR chunk (length, type, width, height, ..., CRC over type + fields).
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)
