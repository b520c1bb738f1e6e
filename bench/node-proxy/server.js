// express + http-proxy-middleware reverse proxy to one target: the stack the gateway is measured against.
const express = require("express");
const { createProxyMiddleware } = require("http-proxy-middleware");

const [port, target] = [Number(process.env.PORT), process.env.TARGET];
const app = express();
app.use("/", createProxyMiddleware({ target, changeOrigin: false, agent: new (require("http").Agent)({ keepAlive: true }) }));
app.listen(port, "127.0.0.1");
