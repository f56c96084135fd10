"""Object detection: SSDLite on MobileOne (``model``), COCO / VOC / YOLO data (``data``), the built-in
semi-synthetic scenes (``builtin``), COCO mAP (``metrics``), and the engine task (``task``)."""
