# Gatehouse gateway image. Node 24: TypeScript route files load natively (type stripping).
FROM node:24-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
COPY plugins ./plugins
COPY examples ./examples
COPY test ./test
COPY bench ./bench
RUN npm run build && npm prune --omit=dev

FROM node:24-slim
ENV NODE_ENV=production
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY gatehouse.yaml ./
COPY routes ./routes
COPY public ./public
COPY deploy/gatehouse.docker.yaml ./deploy/gatehouse.docker.yaml
USER node
EXPOSE 8080 9901
ENTRYPOINT ["node", "dist/src/cli.js"]
CMD ["start", "--config", "deploy/gatehouse.docker.yaml"]
