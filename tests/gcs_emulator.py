"""Runs gcp-storage-emulator on loopback for the gs:// tests: python gcs_emulator.py PORT BUCKET.

The emulator omits the x-goog-generation header on media downloads; TensorStore (Orbax's
storage layer) reads an object's generation from it to make conditional writes, as real GCS
sends it. This launcher adds the header and changes nothing else.
"""

import sys
import time

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # missing object: the original handler answers 404
        obj = None
    if obj:
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation

from gcp_storage_emulator.server import create_server  # noqa: E402  (after the patch)

if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()
