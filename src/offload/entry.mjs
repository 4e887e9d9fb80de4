// Piscina worker entry: the tasks are TypeScript, so register tsx's loader in this thread first
// (a loader registered by the host does not carry over to worker threads).
import { register } from 'tsx/esm/api';

register();
const { runTask } = await import('./thread.ts');
export default runTask;
