"""The process the sensor and the vSensor run in: logging with the guide's debug levels, thread
names the kernel knows, the C allocator's settings. Every other folder may use these."""
