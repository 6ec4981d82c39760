"""A real RTSP camera for the ingest tests: GStreamer's RTSP server playing an H.264 file in real time.

Run by Debian's python3 (python3-gst-1.0, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good),
not the project's virtualenv: `python3 tests/rtsp_server.py PORT FILE.mkv`, serving rtsp://127.0.0.1:PORT/cam.
Each client gets its own pipeline from the file's start; killing the process is the camera dropping.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    port, path = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f'( filesrc location="{path}" ! matroskademux ! rtph264pay name=pay0 pt=96 config-interval=1 )'
    )
    factory.set_shared(False)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
